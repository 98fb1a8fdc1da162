"""The Llama-family model: config, forward pass, checkpoint loading and shape presets."""

from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig, RopeScaling
from workbench.model.llama import LlamaModel
from workbench.model.loading import load_model, load_tokenizer, resolve_model_dir

__all__ = ["ForwardBatch", "LlamaModel", "ModelConfig", "RopeScaling", "load_model",
           "load_tokenizer", "resolve_model_dir"]
