"""Chat with a trained model in the terminal, the answer streamed as it is generated.

    python cli_demo.py                                # model_save/final, else the model in model_save/
    python cli_demo.py --model_dir model_save/sft/best
    python cli_demo.py --stream False --search_type beam   # whole answers behind a spinner

Type a question and press Enter; `exit` quits, `cls` clears the screen, Ctrl+C or Ctrl+D
ends the chat. Every InferConfig field can be set as `--field value` (see --help).
"""
from config import InferConfig
from utils.cli import parse_config, run_cli


def main() -> None:
    _, config = parse_config(InferConfig, description=__doc__)
    from rich.console import Console

    from model.infer import ChatBot, find_model
    from utils.chat_console import run_chat

    console = Console(highlight=False)
    config.model_dir = str(find_model(config))
    with console.status(f"loading {config.model_dir} …"):
        bot = ChatBot(config)
    console.print(f"model: {config.model_dir}")
    run_chat(bot, stream=config.stream, console=console)


if __name__ == "__main__":
    run_cli(main)
