"""Configuration class of the chat model, written into every saved model directory.

`save_pretrained` copies this file next to config.json (with an `auto_map` entry), so
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without this project.
It is a plain T5 configuration: the architecture is T5; only the model class adds
behaviour (`my_generate`).
"""
from transformers import T5Config


class TextToTextModelConfig(T5Config):
    # model_type stays "t5": without trust_remote_code, transformers still loads the
    # weights as a plain T5ForConditionalGeneration.
    model_type = "t5"
