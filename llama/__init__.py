"""Llama 2, Llama 3 and Llama 3.1 inference on CPU and GPU, one process or many."""

from .args import ModelArgs
from .chat_format import ChatFormat, Dialog, DialogError, Message, StopReason
from .checkpoint import CheckpointError
from .generation import ChatPrediction, CompletionPrediction, Llama, TokenEvent
from .model import Transformer
from .tokenizer import Tokenizer, TokenizerError
from .tool_calls import BuiltinTool, CallSyntax, ToolCall, ToolDefinition, ToolParam

__all__ = [
    "ChatFormat", "ChatPrediction", "CheckpointError", "CompletionPrediction", "Dialog", "DialogError",
    "Llama", "Message", "ModelArgs", "StopReason", "TokenEvent", "Tokenizer", "TokenizerError", "Transformer",
    "BuiltinTool", "CallSyntax", "ToolCall", "ToolDefinition", "ToolParam",
]
