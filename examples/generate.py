"""Generate a reply with the Python API: load a checkpoint, render a chat prompt, stream the text.

    python examples/generate.py MODEL_FOLDER ["your prompt"] [max_new_tokens]
"""

import sys

from llamacli.generation import Engine, Finished, Request, SamplingParams


def main() -> None:
    folder = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Write a haiku about the sea."
    max_new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32

    engine = Engine.load(folder, dtype="float32", device="cpu")
    messages = [{"role": "user", "content": prompt}]
    ids = engine.chat_ids(messages) if engine.chat_template else engine.raw_ids(prompt)
    request = Request(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0.0))

    for event in engine.stream(ids, request):  # text pieces as they are produced, then one Finished
        if isinstance(event, Finished):
            s = event.stats
            print(f"\n[{event.reason}: {s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s]", file=sys.stderr)
        else:
            print(event.text, end="", flush=True)


if __name__ == "__main__":
    main()
