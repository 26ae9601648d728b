"""Llama 2, Llama 3 and Llama 3.1 inference on CPU and GPU, one process or many.

The text layer (tokenizers, messages, chat formats, tool calls) imports
without torch; the model, the engine and `Llama` load torch when first used.
"""

import importlib

from .args import ModelArgs
from .chat_format import ChatFormat
from .messages import Dialog, DialogError, Message, StopReason
from .tokenizer import Tokenizer, TokenizerError
from .tool_calls import BuiltinTool, CallSyntax, ToolCall, ToolDefinition, ToolParam

# Names whose modules need torch: imported on first access (PEP 562).
_LAZY = {
    "CheckpointError": "checkpoint",
    "ChatPrediction": "generation",
    "CompletionPrediction": "generation",
    "Llama": "generation",
    "Engine": "engine",
    "Request": "engine",
    "TokenEvent": "engine",
    "SamplingParams": "sampling",
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
