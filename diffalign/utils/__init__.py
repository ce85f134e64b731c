"""Small helpers shared across diffalign, in the style of diffusers' `utils/`: each module imports only the standard
library, third-party packages, `diffalign.errors` and the other modules here, never the rest of diffalign, so any
module can use them without an import cycle (`tests/test_import_graph.py`)."""
