"""A scripted chat with the Python API: the KV cache is reused across turns, so each turn prefills only
what is new since the last one.

    python examples/chat.py MODEL_FOLDER ["first message" "second message" ...]
"""

import sys

from llamacli.generation import ChatSession, Engine, Finished, Request


def main() -> None:
    folder = sys.argv[1]
    messages = sys.argv[2:] or ["Hi! Who are you?", "What can you do?"]

    engine = Engine.load(folder, dtype="float32", device="cpu")
    session = ChatSession(engine, system="You are a helpful assistant.", max_context=1024)
    request = Request(max_new_tokens=24)
    for text in messages:
        print(f"> {text}")
        for event in session.turn(text, request):
            if isinstance(event, Finished):
                print(f"\n  [{event.stats.prefill_tokens} of {event.stats.prompt_tokens} prompt tokens prefilled]")
            else:
                print(event.text, end="", flush=True)


if __name__ == "__main__":
    main()
