"""``qwen-image-omni check --vllm-omni``: is our vllm-omni plugin installed, does it load, what does it serve.

It loads the plugin the way vllm-omni does (the ``vllm_omni.general_plugins`` entry point), asks
vllm-omni's registry which pipeline class it now builds for each Qwen-Image architecture, and
prints the feature table of :mod:`qwen_image_omni.integrations.vllm_omni.features`: which engine
features run on our transformer and which make the plugin hand the engine to vllm-omni's own.

This module imports without vllm-omni (it says so when it is missing).
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, entry_points, version

from .features import ENGINE_FEATURES

PLUGIN_GROUP = "vllm_omni.general_plugins"
PLUGIN_NAME = "qwen_image_omni"

SUPPORTED_VLLM_OMNI = ("0.27.0rc1", "0.32.0rc1")
"""The oldest and the newest vllm-omni the plugin is tested against, each beside the vllm of its X.Y."""


def support_note(omni_version: str) -> str:
    """Whether ``omni_version`` lies in :data:`SUPPORTED_VLLM_OMNI`, in words."""
    from packaging.version import Version

    oldest, newest = SUPPORTED_VLLM_OMNI
    if Version(oldest) <= Version(omni_version) <= Version(newest):
        return f"supported ({oldest} to {newest})"
    return f"untested: qwen-image-omni is tested with vllm-omni {oldest} to {newest}"


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def feature_lines() -> list[str]:
    """One line per engine feature: served by ours, or handed to vllm-omni's transformer and why."""
    width = max(len(feature.name) for feature in ENGINE_FEATURES)
    lines = []
    for feature in ENGINE_FEATURES:
        where = "ours" if feature.native else f"vllm-omni's transformer ({feature.why})"
        lines.append(f"  {feature.name:<{width}}  [{feature.option}]  {where}")
    return lines


def check_vllm_omni() -> int:
    """Print the plugin report; 1 when the plugin is missing, fails to import or resolves another class, else 0.

    Without vllm-omni installed there is nothing to serve: it says so and returns 0.
    """
    omni_version = installed_version("vllm-omni")
    if omni_version is None or importlib.util.find_spec("vllm_omni") is None:
        print("vllm-omni: not installed (pip install 'qwen-image-omni[vllm-omni]' to serve with it)")
        return 0
    print(f"vllm-omni: {omni_version} (vllm {installed_version('vllm')}), {support_note(omni_version)}")
    plugins = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == PLUGIN_NAME]
    if not plugins:
        print(f"plugin: FAIL, no {PLUGIN_GROUP!r} entry point named {PLUGIN_NAME!r} (reinstall qwen-image-omni)")
        return 1
    try:
        register = plugins[0].load()
        # What register() imports, imported here first: register() would only log a failure (as vllm-omni does).
        from . import pipelines as integration
        from . import teacache  # noqa: F401

        register()
        from vllm_omni.diffusion.registry import DiffusionModelRegistry
    except Exception as error:  # noqa: BLE001 - any import failure means vllm-omni serves without us
        print(f"plugin: FAIL, {plugins[0].value} does not load: {type(error).__name__}: {error}")
        print("vllm-omni then logs the error and serves its own Qwen-Image transformer.")
        return 1
    print(f"plugin: {plugins[0].value} loaded")
    resolved_all = True
    for architecture in integration.PIPELINES:
        cls = DiffusionModelRegistry._try_load_model_cls(architecture)
        ours = cls is getattr(integration, architecture)
        resolved_all &= ours
        name = "None" if cls is None else f"{cls.__module__}.{cls.__qualname__}"
        print(f"  {architecture}: {name} [{'ours' if ours else 'FAIL: not ours'}]")
    print("features (an engine asking for one served by vllm-omni's transformer runs on vllm-omni's own pipeline):")
    print("\n".join(feature_lines()))
    return 0 if resolved_all else 1
