"""vLLM plugin (entry point group `vllm.general_plugins`): registers gisp-deploy's model classes with vLLM.

vLLM calls `register()` in every process it starts, possibly several times; registration is lazy
("module:Class" strings: the model code is imported only where vLLM builds the model) and idempotent.
Also registered: a config check that computes the slice in vLLM's front-end process, so that a bad sparsity
or tensor-parallel size fails early with gisp-deploy's message; and, for exported slices (model_type
`gisp_llama` & co.), their config classes with transformers.
"""


def register() -> None:
    from vllm import ModelRegistry

    from ..families import GISP_ARCHITECTURES

    supported = set(ModelRegistry.get_supported_archs())
    for arch in GISP_ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, f"gisp_deploy.serving.vllm_models:{arch}")
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        from .vllm_slice import VerifyConfig

        for arch in GISP_ARCHITECTURES:
            MODELS_CONFIG_MAP.setdefault(arch, VerifyConfig)
    except ImportError:  # another vLLM layout: the model classes check the same when they are built
        pass
    try:  # exported slices: model_type gisp_llama & co. must resolve in AutoConfig
        from .. import modeling

        modeling.register()
    except (ImportError, AttributeError):  # a gisp_deploy.modeling without the Gisp* config classes
        pass
