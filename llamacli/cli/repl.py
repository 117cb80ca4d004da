"""The read-reply loop of `llamacli chat`: input lines, /commands, streamed replies and the context-full policy.

Replies go to stdout (one line per turn when piped, so scripts stay in step); prompts, notices and errors go to
stderr. The conversation itself is the session's `prompts.Conversation`.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Optional

from llamacli.cli.app import debug_mode, error_line, note, stats_line, stderr, write
from llamacli.errors import ContextOverflowError, InputError, LlamaCliError
from llamacli.prompts import default_max_new_tokens
from llamacli.request import Finished, Request
from llamacli.text import check_text, decode_text

HELP = """commands:
  /help          this help
  /reset         forget the conversation (and its cached keys/values)
  /system TEXT   set the system message (/system alone removes it)
  /stats         counts and speeds of the last reply
  /exit          quit (Ctrl-D too); Ctrl-C stops a reply and keeps the session"""


class ChatLoop:
    """Reads turns and /commands, and streams each reply of the chat session."""

    def __init__(self, engine, session, sampling, seed, max_new_tokens, stop, as_json, show_stats):
        self.engine, self.session, self.sampling, self.seed = engine, session, sampling, seed
        self.max_new_tokens, self.stop, self.as_json, self.show_stats = max_new_tokens, stop, as_json, show_stats
        self.last_stats = None
        self.turns = 0
        self.line_no = 0  # input lines read so far (errors name the line)

    def read(self, interactive: bool) -> Optional[str]:
        """The next input line, or None at end of input; InputError when that line is not valid text."""
        where = f"line {self.line_no + 1} of standard input"
        if interactive:
            try:
                line = stderr().input(">>> ", markup=False)
            except EOFError:
                write("\n")
                return None
            self.line_no += 1
            return check_text(line, where)  # undecodable terminal bytes arrive as lone surrogates
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.readline() if stream is not None else sys.stdin.readline().encode("utf-8", "surrogatepass")
        if not data:
            return None
        self.line_no += 1
        return check_text(decode_text(data, where), where).rstrip("\r\n")

    def run(self, interactive: bool) -> bool:
        """Read turns until end of input or /exit; return whether any turn failed (piped mode)."""
        failed = False
        while True:
            try:
                line = self.read(interactive)
            except KeyboardInterrupt:
                write("\n")
                note("(Ctrl-C: /exit or Ctrl-D quits)")
                continue
            except InputError as exc:  # one bad line fails its turn; the session goes on
                failed |= not self.turn_failed(str(exc))
                continue
            if line is None:
                return failed
            if not line.strip():
                continue
            if line.startswith("/"):
                if self.command(line.strip()):
                    return failed
                continue
            failed |= not self.turn(line)

    def command(self, line: str) -> bool:
        """Run a /command; return True to quit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return True
        if name == "/help":
            note(HELP)
        elif name == "/reset":
            self.session.reset()
            note("(conversation cleared)")
        elif name == "/system":
            self.session.set_system(arg.strip() or None)
            note("(system message set)" if arg.strip() else "(system message removed)")
        elif name == "/stats":
            if self.last_stats is None:
                note("(no reply yet)")
            else:
                note(stats_line(self.last_stats) + f", turns {self.turns}, "
                     f"cached positions {len(self.session.cached_ids)} of {self.session.n_positions}")
        else:
            note(f"unknown command {name}; /help lists the commands")
        return False

    def request_for(self, ids: list[int]) -> Request:
        """The Request of a turn whose prompt is ids: --max-new-tokens, else the default capped to the room left."""
        room = self.session.n_positions - len(ids)
        n_new = self.max_new_tokens or default_max_new_tokens(self.engine.config.generation, room)
        return Request(max_new_tokens=n_new, sampling=self.sampling, seed=self.seed, stop=self.stop)

    def turn(self, text: str) -> bool:
        """One user turn and the streamed reply; returns False when the turn could not run."""
        conversation = self.session.conversation
        while True:
            try:
                ids = self.session.prompt_ids(text)
                events = self.session.turn(text, self.request_for(ids))
                first = next(events)  # the context check happens here, before anything is shown
                break
            except ContextOverflowError as exc:
                # The policy when the context is full: forget the oldest turn and try again, until none is left.
                if conversation.drop_oldest():
                    note("(context full: dropped the oldest turn; /reset starts over)")
                    continue
                return self.turn_failed(str(exc))
            except LlamaCliError as exc:
                if debug_mode():
                    raise
                return self.turn_failed(str(exc))
        finished = None
        try:
            # Run the turn to its end: the session records the reply and its cache after the last event.
            for event in itertools.chain([first], events):
                if isinstance(event, Finished):
                    finished = event
                elif not self.as_json and event.text:
                    write(event.text)
        except KeyboardInterrupt:
            events.close()
            if not self.as_json:
                write("\n")
            note("(reply stopped; it is not kept in the conversation)")
            return True
        self.turns += 1
        self.last_stats = finished.stats
        if self.as_json:
            print(json.dumps({"role": "assistant", "content": finished.text, "token_ids": finished.token_ids,
                              "prompt_token_ids": ids, "prefill_tokens": finished.stats.prefill_tokens,
                              "finish_reason": finished.reason, **finished.stats.draft_dict()},
                             ensure_ascii=False), flush=True)
        else:
            write("\n")
        if self.show_stats:
            note(stats_line(finished.stats) + f", finish {finished.reason}")
        return True

    def turn_failed(self, message: str) -> bool:
        """Report a turn that could not run, keeping one output line per input line; returns False."""
        error_line(message)
        if self.as_json:
            print(json.dumps({"role": "assistant", "content": "", "finish_reason": "error", "error": message}),
                  flush=True)
        else:
            write("\n")
        return False
