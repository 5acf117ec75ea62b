"""Chat templates: the one place where chat-formatted prompt text is made.

A model's chat template is the Jinja2 `chat_template` of its tokenizer_config.json (or a
`chat_template.jinja` file beside it). It is rendered the way Hugging Face transformers'
`apply_chat_template` renders it, so that the strings, and so the ids, are the same:

* a sandboxed environment with `trim_blocks` and `lstrip_blocks` on and the `loopcontrols`
  extension (`{% break %}`, `{% continue %}`);
* globals `raise_exception(message)` (raises jinja2's TemplateError) and
  `strftime_now(format)`; a `tojson` filter that keeps non-ASCII characters and takes
  `indent`, `separators` and `sort_keys`; a `{% generation %}...{% endgeneration %}` block
  that renders its body unchanged;
* variables `messages`, `tools` (None), `documents` (None), `add_generation_prompt`, the
  tokenizer's special-tokens map (`bos_token`, `eos_token`, ..., `additional_special_tokens`)
  and any extra keyword (CLaRa passes `enable_thinking=False`); extra keywords win over the
  special tokens.

CLaRa's prompts are [system, user(, assistant)] conversations (`system_user_chat`): the
prompt is rendered with add_generation_prompt=True, the full row (with the assistant turn)
with add_generation_prompt=False. A template that rejects the system role with an error
containing "System role not supported" gets one user turn "{system}\\n{user}" instead, as the
official code does (apple/ml-clara modeling_clara.py:1018-1029).
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

SYSTEM_ROLE_UNSUPPORTED = "System role not supported"

# Mistral-7B-Instruct-v0.2's published chat format: the system message joins the first user
# turn ("<s> [INST] {system}\n\n{user} [/INST]"), an assistant turn is " {text}</s>", and
# add_generation_prompt adds nothing. The format of every sentencepiece (Mistral) tokenizer
# that comes without a tokenizer_config.json.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders body (transformers marks assistant
    tokens with it; the text is unchanged)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body
                                      ).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """A chat template's Jinja2 source compiled in transformers' environment (module doc)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# Compiled once: the template of baselines built without a tokenizer (immutable).
MISTRAL_TEMPLATE = compile_template(MISTRAL_CHAT_TEMPLATE)
MISTRAL_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def render(template: jinja2.Template, messages: Sequence[Mapping[str, Any]],
           special_tokens: Mapping[str, Any], *, add_generation_prompt: bool = False,
           **kwargs: Any) -> str:
    """The conversation's text, as `apply_chat_template(messages, tokenize=False, ...)`
    gives it. special_tokens: the tokenizer's special-tokens map; kwargs: extra template
    variables (they override special tokens of the same name)."""
    variables = {**special_tokens, **kwargs}
    return template.render(messages=list(messages), tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **variables)


def system_user_chat(template: jinja2.Template, special_tokens: Mapping[str, Any], system: str,
                     user: str, assistant: str | None = None) -> str:
    """CLaRa's chat text: [system, user] with the generation prompt when assistant is None,
    else [system, user, assistant] without it; rendered with enable_thinking=False. A
    template raising "System role not supported" gets [user "{system}\\n{user}"(, assistant)].
    """
    tail = [] if assistant is None else [{"role": "assistant", "content": assistant}]
    turns = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        return render(template, turns + tail, special_tokens,
                      add_generation_prompt=assistant is None, enable_thinking=False)
    except jinja2.exceptions.TemplateError as e:
        if SYSTEM_ROLE_UNSUPPORTED not in str(e):
            raise
    turns = [{"role": "user", "content": f"{system}\n{user}"}]
    return render(template, turns + tail, special_tokens,
                  add_generation_prompt=assistant is None, enable_thinking=False)


def system_prefix(template: jinja2.Template, special_tokens: Mapping[str, Any], system: str
                  ) -> str:
    """The text every `system_user_chat` prompt with this system message starts with (the
    rendering before the user's text)."""
    marker = "\x00user\x00"
    text = system_user_chat(template, special_tokens, system, marker)
    return text[:text.index(marker)]
