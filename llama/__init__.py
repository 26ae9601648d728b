"""Llama 2, Llama 3 and Llama 3.1 inference on CPU and GPU, one process or many.

The text layer (tokenizers, messages, chat formats, tool calls) imports
without torch; the model, the engine and `Llama` load torch when first used.
"""

import importlib

from .text.chat_format import ChatFormat
from .text.messages import Dialog, DialogError, Message, StopReason
from .text.tokenizer import Tokenizer, TokenizerError
from .text.tool_calls import BuiltinTool, CallSyntax, ToolCall, ToolDefinition, ToolParam
from .weights.args import ModelArgs

# Names whose modules need torch: imported on first access (PEP 562).
_LAZY = {
    "CheckpointError": "weights.checkpoint",
    "ChatPrediction": "generation",
    "CompletionPrediction": "generation",
    "Llama": "generation",
    "Engine": "engine.engine",
    "Request": "engine.engine",
    "TokenEvent": "engine.engine",
    "SamplingParams": "engine.sampling",
    "Transformer": "model",
}

__all__ = [
    "ChatFormat", "ChatPrediction", "CheckpointError", "CompletionPrediction", "Dialog", "DialogError", "Engine",
    "Llama", "Message", "ModelArgs", "Request", "SamplingParams", "StopReason", "TokenEvent", "Tokenizer",
    "TokenizerError", "Transformer", "BuiltinTool", "CallSyntax", "ToolCall", "ToolDefinition", "ToolParam",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
