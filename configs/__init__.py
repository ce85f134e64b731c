"""YAML presets, selected by name: `diffalign train ddpo --config digits-ddpo`."""
