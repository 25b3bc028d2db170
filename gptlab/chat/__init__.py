"""Chat: context management (a stack of turns fitted to the context) and the terminal chat."""
from gptlab.chat.context import TurnTooLong, fit_messages, split_turns
from gptlab.chat.terminal import ChatConfig, ChatSession, chat, run_chat

__all__ = ["fit_messages", "split_turns", "TurnTooLong", "ChatConfig", "ChatSession", "chat",
           "run_chat"]
