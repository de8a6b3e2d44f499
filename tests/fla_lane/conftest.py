"""The fla lane's set-up (run by ``tests/fla_lane/run``, which sets WRITESAE_FLA_LANE=1): Triton's interpreter
patched (``shim.py``) before fla is imported, and "cpu" among the devices transformers calls fla on (it binds
fla's kernels when the modeling module is imported and calls them only for inputs on its listed devices), so
that transformers' own Qwen3.5 forward runs fla's kernels on this CPU. In the main environment (no Triton,
no fla) every test file here skips itself."""
import os

LANE = os.environ.get("WRITESAE_FLA_LANE") == "1"
if LANE:
    import shim

    shim.install()
    from transformers.integrations import hub_kernels

    hub_kernels._PACKAGE_SUPPORTED_DEVICES["fla"] += ("cpu",)
