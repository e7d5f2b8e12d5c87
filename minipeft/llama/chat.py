"""A checkpoint's chat template: the conversation as text, with the model's own turn markers, rendered as
transformers' apply_chat_template renders it, then tokenized. The template comes from tokenizer_config.json
(`chat_template`), a Jinja template, with the special tokens' names (`bos_token`, `eos_token`).

    [{"role": "user", "content": "Hi"}] ─► "<|im_start|>system ... <|im_end|>\n<|im_start|>user\nHi<|im_end|>\n
                                             <|im_start|>assistant\n" ─► token ids (special tokens by their ids)
"""

import json

import regex

from ..errors import BadInput


def chat_settings(weights_dir, config: dict) -> dict:
    """tokenizer_config.json's chat_template and the special tokens' names a template may use (`config`: that
    file, read)."""
    path = weights_dir / "tokenizer_config.json"
    settings = {key: config.get(key) for key in ("chat_template", "bos_token", "eos_token")}
    if isinstance(settings["chat_template"], list):  # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in settings["chat_template"] if isinstance(t, dict)}
        settings["chat_template"] = named.get("default")
    for key, value in settings.items():
        if isinstance(value, dict):  # {"content": "<s>", ...}, as older files write special tokens
            settings[key] = value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise BadInput(f"{path}: key {key!r} should be a string, got {value!r}")
    return settings


def chat_ids(tokenizer, messages, add_generation_prompt=True) -> list[int]:
    """The token ids of a conversation ([{"role": "user", "content": ...}, ...]) in the checkpoint's chat
    template, rendered as transformers' apply_chat_template renders it (a sandboxed Jinja template; the
    special tokens are written in the text, so nothing is added around it)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = tokenizer.chat.get("chat_template")
    if not template:
        raise BadInput("chat: the checkpoint's tokenizer_config.json has no chat_template")

    def raise_exception(message):
        raise BadInput(f"chat template: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: __import__("datetime").datetime.now().strftime(format)
    try:
        text = environment.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.chat.get("bos_token") or "", eos_token=tokenizer.chat.get("eos_token") or "")
    except jinja2.TemplateError as e:
        raise BadInput(f"chat template: {e}") from None
    specials = {tokenizer.chat.get(name): token_id for name, token_id in
                (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)) if tokenizer.chat.get(name)}
    ids = []
    for piece in (regex.split(f"({'|'.join(map(regex.escape, specials))})", text) if specials else [text]):
        ids += [specials[piece]] if piece in specials else tokenizer.encode(piece, add_bos=False, add_eos=False)
    return ids
