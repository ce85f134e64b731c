# diffalign: a minimal stand-in for `parameterized.parameterized.expand` (the `parameterized` package is not installed
# in this environment). As the real one, `expand` adds one test method per parameter set to the class body being
# defined, named `<name>_<index>_<first parameter>`, and leaves a non-test (`__test__ = False`) under the original name.
import functools
import re
import sys
import unittest


class parameterized:
    @staticmethod
    def expand(params):
        def decorator(func):
            namespace = sys._getframe(1).f_locals  # the class body being executed
            for index, param in enumerate(params):
                args = param if isinstance(param, tuple) else (param,)
                suffix = re.sub("[^a-zA-Z0-9_]+", "_", str(args[0]))  # as parameterized.to_safe_name
                name = f"{func.__name__}_{index}_{suffix}"

                def method(self, _args=args):
                    return func(self, *_args)

                functools.update_wrapper(method, func)
                method.__name__ = method.__qualname__ = name
                namespace[name] = method
            # what stays under the original name is not a test (decorators above `expand` may still wrap it)
            def not_a_test(self):
                raise unittest.SkipTest("parameterized template, run through its expanded variants")

            not_a_test.__test__ = False
            return not_a_test

        return decorator
