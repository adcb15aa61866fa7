"""Rendering: each row (alpaca / completion / text / chat) -> text plus the character spans that carry loss."""

from __future__ import annotations

from harness.config import ConfigError

# Built-in prompt templates (documented in the README). The response follows the prompt directly.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
REQUIRED = {"alpaca": ("instruction", "output"), "completion": ("prompt", "completion"), "text": ("text",), "chat": ("messages",)}
OPTIONAL = {"alpaca": ("input",)}

# Chat template for tokenizers without one (or data.chat_template=builtin). Each message renders as
# "### Role:\n{content}\n\n" and an assistant message ends with the EOS token before the blank line;
# the generation prompt is "### Assistant:\n". BOS is added by the tokenizer as for plain text.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def chat_template_for(tokenizer, choice: str = "auto") -> tuple[str, str]:
    """(template, which): the tokenizer's chat template, or the built-in one."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default")
    if choice == "builtin" or not tmpl:
        return BUILTIN_CHAT_TEMPLATE, "built-in"
    return tmpl, "tokenizer's"


class TemplateError(ConfigError):
    pass


def render_chat(messages: list[dict], tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; every assistant turn carries loss. The template is applied to growing
    prefixes so each turn's characters are known exactly: a turn's span runs from the end of the
    generation prompt to the end of the turn (whitespace the template puts between turns excluded)."""

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise TemplateError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole "
                "(it rewrites earlier turns), so assistant turns cannot be located; set data.chat_template=builtin"
            )
        spans.append((len(prefix), max(len(prefix), len(upto.rstrip()))))
    return full, spans


def _text(value, name: str) -> tuple[str | None, str | None]:
    """(text, problem) for a field that must be text."""
    if value is None:
        return None, f"no field '{name}'"
    if isinstance(value, str):
        return value, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"field '{name}' must be text, got {type(value).__name__}"


def _messages(value) -> tuple[list | None, str | None]:
    if value is None:
        return None, "no field 'messages'"
    if not isinstance(value, list) or not value:
        return None, "field 'messages' must be a non-empty list of {role, content}"
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None, f"message {j} has no 'role' (each message is {{role, content}})"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return None, f"message {j} content must be text, got {type(content).__name__}"
        clean = {k: v for k, v in m.items() if v is not None}
        clean["content"] = content or ""
        out.append(clean)
    return out, None


def render_row(row: dict, fmt: str, tokenizer, template: str | None = None) -> tuple[str | None, list, str | None]:
    """(text, loss_spans, problem): loss_spans are [start, end) character ranges of what is learned."""
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        text, bad = _text(row.get("text"), "text")
        return (None, [], bad) if bad else (text + eos, [(0, len(text) + len(eos))], None)
    if fmt == "alpaca":
        ins, bad = _text(row.get("instruction"), "instruction")
        out, bad2 = _text(row.get("output"), "output")
        inp, bad3 = _text(row.get("input"), "input") if row.get("input") is not None else ("", None)
        if bad or bad2 or bad3:
            return None, [], bad or bad2 or bad3
        prompt = (ALPACA_PROMPT_WITH_INPUT if inp else ALPACA_PROMPT).format(instruction=ins, input=inp)
        return prompt + out + eos, [(len(prompt), len(prompt) + len(out) + len(eos))], None
    if fmt == "completion":
        prompt, bad = _text(row.get("prompt"), "prompt")
        out, bad2 = _text(row.get("completion"), "completion")
        if bad or bad2:
            return None, [], bad or bad2
        return prompt + out + eos, [(len(prompt), len(prompt) + len(out) + len(eos))], None
    if fmt == "chat":
        msgs, bad = _messages(row.get("messages"))
        if bad:
            return None, [], bad
        try:
            text, spans = render_chat(msgs, tokenizer, template or chat_template_for(tokenizer)[0])
        except TemplateError:
            raise
        except Exception as e:  # the template refused the conversation (unknown role, order...)
            return None, [], f"the chat template failed ({type(e).__name__}: {e})"
        return text, spans, None
    raise ConfigError(f"unknown data format '{fmt}'")
