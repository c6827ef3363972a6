"""MiniMax-M3's chat format: markers, tool-call parser and the tokenizer setup (below loading,
whose `load` returns a tokenizer already set up)."""
