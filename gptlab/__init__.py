"""gptlab: the recipe behind ChatGPT, from the Transformer up.

The Python API mirrors the command line: `gptlab.api` (load, generate_text), the stages in
`gptlab.train` (pretrain, sft, train_reward_model, ppo, pipeline), the built-in world in
`gptlab.world`, and Hugging Face / GGUF interop in `gptlab.interop`.
"""
__version__ = "0.1.0"
