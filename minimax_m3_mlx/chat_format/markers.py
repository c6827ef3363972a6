"""The markers of MiniMax-M3's chat format (see tokenizer.py for what they mean)."""

NS_TOKEN = "]<]minimax[>["
THINK_START = "<mm:think>"
THINK_END = "</mm:think>"
TOOL_CALL_START = NS_TOKEN + "<tool_call>"
TOOL_CALL_END = NS_TOKEN + "</tool_call>"
THINKING_MODES = ("enabled", "adaptive", "disabled")
