"""Loaded by every process of the test's SkyPilot API server (its PYTHONPATH starts here).

SkyPilot checks cloud access in the server's worker processes, not in the test
process, so its own test fixture (``enable_all_clouds``: patch
``sky.check.get_cached_enabled_clouds_or_refresh`` and
``sky.check.check_capability``) has to be applied in each of them. This does it
when ``sky.check`` is first imported, for the clouds named in
``SKYVM_TEST_ENABLED_CLOUDS``. Nothing else of SkyPilot is changed: the
optimizer, the request queue, the launch path and its dry run are real.
"""

import importlib.abc
import importlib.util
import os
import sys

CLOUDS = [c for c in os.environ.get("SKYVM_TEST_ENABLED_CLOUDS", "").split(",") if c]


def _enable(check_module) -> None:
    from sky import clouds as sky_clouds

    registry = {"aws": sky_clouds.AWS, "gcp": sky_clouds.GCP, "azure": sky_clouds.Azure, "lambda": sky_clouds.Lambda}

    def enabled(*_args, **_kwargs):
        return [registry[c]() for c in CLOUDS]

    check_module.get_cached_enabled_clouds_or_refresh = enabled
    check_module.check_capability = lambda *a, **k: {"default": [str(c) for c in enabled()]}


class _PatchSkyCheck(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sky.check":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        real = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                _enable(module)

        spec.loader = Loader()
        return spec


if CLOUDS:
    sys.meta_path.insert(0, _PatchSkyCheck())
