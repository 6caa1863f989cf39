"""Token in, token out: what one episode was served, as token ids, and how a new call extends it.

An OpenAI client sends the whole conversation with every call. Re-tokenizing that text would give
ids the policy never produced (a sampled "4" "6" re-reads as the merged "46"; a chat template may
re-render or drop earlier turns), so the gateway keeps, per episode, the exact ids of everything it
served: each call's prompt and the completion the engine sampled, with their log-probs and a mask of
the tokens the policy wrote. A new call is rendered with the chat template to text; when that text
starts with the text of the ids held, only the rest is tokenized and appended. When it does not
(an edited or reordered history, a template that drops earlier content, an assistant message the
gateway never served), the call starts a new *branch* of the episode from the fully tokenized
prompt, and the reason is recorded: the learner sees two honest sequences, never one whose ids
disagree with what the policy saw.

Model output is untrusted text: tool calls are parsed from ``<tool_call>{json}</tool_call>`` blocks
(the format Qwen2.5/Hermes chat templates use) with ``json.loads`` and checked; anything that does
not parse stays plain content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from treeplay.engines.contract import decode

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class RequestError(ValueError):
    """A request the gateway cannot serve; the message is one line, sent back as HTTP 400."""


def parse_tool_calls(text: str, id_prefix: str) -> tuple[str, list[dict[str, Any]]]:
    """Split a completion into its plain content and OpenAI-format tool calls.

    A ``<tool_call>`` block counts only when it holds a JSON object with a string ``name`` (and
    ``arguments`` an object or a JSON string); other blocks are left in the content as written.

    Returns:
        ``(content, tool_calls)``; tool call ids are ``{id_prefix}_{i}``.
    """
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for m in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                continue
        if not isinstance(args, dict):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"{id_prefix}_{len(calls)}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args)}})
    kept.append(text[pos:])
    return ("".join(kept).strip() if calls else text), calls


def _text_content(content: Any, where: str) -> str:
    """A message's content as text: a string, None, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise RequestError(f"{where}: only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise RequestError(f"{where}: content must be a string or a list of text parts")


def served_key(message: dict[str, Any]) -> tuple:
    """What identifies an assistant message the gateway served when a client sends it back: its tool
    call ids when it made calls (clients may re-serialise the arguments), else its text."""
    calls = message.get("tool_calls") or []
    if calls:
        return ("tools", tuple(str(c.get("id", "")) if isinstance(c, dict) else "" for c in calls))
    return ("text", _text_content(message.get("content"), "assistant message"))


@dataclass
class Branch:
    """One linear token sequence of an episode: everything served, in order, as ids.

    ``mask[i]`` is True for tokens the policy generated (the only ones a learner trains on);
    ``logprobs[i]`` is the sampling log-prob of a generated token, None for context."""

    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    text: str = ""  # decode(ids), kept to compare the next call's rendering against

    def extend(self, ids: list[int], policy: bool, logprobs: list[float] | None = None) -> None:
        """Append ids (``text`` is brought up to date by the caller, once per call)."""
        self.ids += ids
        self.mask += [policy] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [None] * len(ids)


@dataclass
class Rendered:
    """A call's prompt: its text, and how its ids relate to the episode's branches."""

    text: str
    ids: list[int]
    branch: int  # the branch these ids continue (a new one on drift)
    new_tokens: int  # ids encoded for this call (the rest were held)
    drift: str | None = None  # why the call started a new branch, if it did


class Conversation:
    """The token state of one episode: its branches and the assistant messages it served.

    Args:
        tokenizer: The engine's tokenizer (the chat template renders requests).
    """

    def __init__(self, tokenizer: Any, template: str = "model") -> None:
        self.tokenizer = tokenizer
        self.template = template  # "model": the tokenizer's chat template; "plain": contents joined
        self.branches: list[Branch] = []
        self.served: dict[tuple, str] = {}  # served_key -> the raw completion text the model wrote

    def chat_messages(self, messages: Any) -> list[dict[str, str]]:
        """The client's messages as the chat template sees them: assistant messages the gateway
        served become the raw text the model wrote (tool-call blocks included); others keep theirs.

        Raises:
            RequestError: Messages that are not a list of role/content objects.
        """
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list")
        out: list[dict[str, str]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a string role")
            role = m["role"]
            if role == "assistant":
                raw = self.served.get(served_key(m))
                if raw is None:  # not ours: render what the client says it was
                    raw = _text_content(m.get("content"), f"messages[{i}]") + "".join(
                        "<tool_call>" + json.dumps({"name": c.get("function", {}).get("name", ""),
                                                    "arguments": _arguments(c)}) + "</tool_call>"
                        for c in (m.get("tool_calls") or []) if isinstance(c, dict))
                out.append({"role": role, "content": raw})
            else:
                out.append({"role": role, "content": _text_content(m.get("content"), f"messages[{i}]")})
        return out

    def render_chat(self, messages: Any, tools: Any = None) -> str:
        if self.template == "plain":
            # A base model without a chat format reads the conversation as one text: each message's
            # content as it is, one after another (the gateway's raw /v1/completions prompt).
            return "".join(m["content"] for m in self.chat_messages(messages))
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions")
        if tools is not None and not isinstance(tools, list):
            raise RequestError("tools must be a list")
        return self.tokenizer.apply_chat_template(self.chat_messages(messages), tools=tools or None,
                                                  tokenize=False, add_generation_prompt=True)

    def prompt(self, text: str, raw: bool = False) -> Rendered:
        """The ids of a call whose rendered prompt is ``text``: the newest branch's ids plus the new
        text's tokens when ``text`` extends that branch, else a new branch.

        ``raw``: the text of a /v1/completions call or of the plain template (tokenized with the
        tokenizer's special tokens, a BOS where it adds one, as the engines tokenize raw prompts)."""
        raw = raw or self.template == "plain"
        if self.branches and text.startswith(self.branches[-1].text) and self.branches[-1].ids:
            branch = self.branches[-1]
            new = list(self.tokenizer(text[len(branch.text):], add_special_tokens=False)["input_ids"])
            return Rendered(text, branch.ids + new, len(self.branches) - 1, len(new))
        ids = list(self.tokenizer(text, add_special_tokens=raw)["input_ids"])
        drift = None
        if self.branches:
            held = self.branches[-1].text
            at = next((i for i, (a, b) in enumerate(zip(held, text, strict=False)) if a != b), min(len(held), len(text)))
            drift = (f"the request's history differs from what was served at character {at} "
                     f"(served {held[at:at + 24]!r}, got {text[at:at + 24]!r})")
        return Rendered(text, ids, len(self.branches), len(ids), drift)

    def commit(self, rendered: Rendered, completion_ids: list[int], logprobs: list[float],
               raw_text: str, message: dict[str, Any]) -> None:
        """Record a served call: its prompt's new tokens as context, the completion as the policy's."""
        if rendered.branch == len(self.branches):
            self.branches.append(Branch())
        branch = self.branches[rendered.branch]
        branch.extend(rendered.ids[len(branch.ids):], policy=False)
        branch.extend(list(completion_ids), policy=True, logprobs=list(logprobs))
        branch.text = decode(self.tokenizer, branch.ids)
        self.served[served_key(message)] = raw_text


def _arguments(call: dict[str, Any]) -> Any:
    args = call.get("function", {}).get("arguments", "{}")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args
