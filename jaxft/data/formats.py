"""Records to token sequences with a loss mask: `alpaca`, chat `messages`, plain `text` and `seq2seq`.

alpaca and messages are rendered with the tokenizer's chat template (alpaca becomes one user turn, instruction
then input, and one assistant turn), or with a plain `### Instruction / ### Response` template when the
tokenizer has none; the loss counts only assistant tokens. Each assistant turn is located by rendering the
conversation up to it with `add_generation_prompt=True` (its start) and up to its end, checking both are
prefixes of the whole rendering; the token boundaries are where the tokenizations of those prefixes stop
agreeing with the tokenization of the whole (a token straddling the start of a response counts as response,
one straddling its end does not; chat templates put special tokens there, so this is about the plain
template). text counts every token; long documents are cut into chunks. seq2seq (a source and a target field,
for summarization or translation with a decoder-only model) puts the source into a prompt template and the
target after it: one user turn and one assistant turn under the chat template, or the prompt followed directly
by the target without one; the loss counts the target (and EOS).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jaxft.data.sources import DataError, Record

log = logging.getLogger(__name__)

FIELDS = {"alpaca": ("instruction", "input", "output"), "messages": ("messages", "role", "content"),
          "text": ("text",), "seq2seq": ("source", "target")}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_CHUNK = 1024  # records per batched tokenizer call
# A record above this many bytes (UTF-8, all its text fields together) is skipped and counted before it is
# tokenized: fast tokenizers take ~200 bytes of memory per byte of text, so one 50 MB line would take 10 GB.
# A text document above it is not skipped but tokenized in pieces of at most this size, cut at a space or
# line break between two words (where byte-level BPE pre-tokenizers split anyway).
MAX_RECORD_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized examples stored flat: example e is ids[starts[e]:starts[e + 1]], at most seq_len + 1 tokens.

    loss[j] is True where token j is a target that counts (a response token, or any token of text); an
    example's first token is never a target, and every example has at least one counted target. Each
    example ends with EOS unless it was truncated or is a non-final chunk of a long document.
    """

    ids: np.ndarray  # (total,) int32
    loss: np.ndarray  # (total,) bool
    starts: np.ndarray  # (E + 1,) int64
    skipped_too_long: int  # records whose prompt alone fills seq_len: never trained on
    skipped_empty: int  # records with nothing to predict
    skipped_oversized: int = 0  # records above MAX_RECORD_BYTES: never tokenized

    def __len__(self) -> int:
        return len(self.starts) - 1

    def lengths(self) -> np.ndarray:
        """(E,) positions each example takes in a row: its tokens minus one (inputs and targets are shifted)."""
        return np.diff(self.starts) - 1

    def target_tokens(self) -> int:
        return int(self.loss.sum() - self.loss[self.starts[:-1]].sum())  # first tokens are never targets

    def take(self, index: np.ndarray) -> Examples:
        """The examples at `index`, in that order; the skipped counts (of the source) are kept."""
        pieces = [slice(self.starts[e], self.starts[e + 1]) for e in index]
        lengths = np.diff(self.starts)[np.asarray(index, np.int64)]
        return dataclasses.replace(
            self, ids=np.concatenate([self.ids[p] for p in pieces] or [np.zeros(0, np.int32)]),
            loss=np.concatenate([self.loss[p] for p in pieces] or [np.zeros(0, bool)]),
            starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def field_names(format: str, fields: dict | None) -> dict[str, str]:
    """The column name for each field of `format` (see FIELDS), defaults overridden by `fields`."""
    if format not in FIELDS:
        raise ValueError(f"unknown format {format!r} (expected one of {', '.join(FIELDS)})")
    unknown = sorted(set(fields or {}) - set(FIELDS[format]))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for format {format!r} (it has {', '.join(FIELDS[format])})")
    return {k: (fields or {}).get(k, k) for k in FIELDS[format]}


def tokenize_records(records: list[Record], format: str, tokenizer, seq_len: int, *, fields: dict | None = None,
                     system_prompt: str = "", chat_template: bool = True,
                     prompt_template: str = "{source}", max_record_bytes: int = MAX_RECORD_BYTES) -> Examples:
    """Validates, renders and tokenizes `records` (a `transformers` tokenizer with an EOS token).

    An example is cut to seq_len + 1 tokens (seq_len positions once shifted): a text document becomes
    several chunks, overlapping by one token so that every token is a target once; a conversation keeps its
    head, or is skipped (and counted) when no response token survives. `system_prompt` becomes the system
    message of conversations that have none; `chat_template=False` forces the plain template. `prompt_template`
    (seq2seq only) is the prompt, its "{source}" replaced by the source field. Raises DataError naming the
    record for a missing or mistyped field. A record of more than `max_record_bytes` is skipped and counted
    (a text document: tokenized in pieces; see MAX_RECORD_BYTES).
    """
    names = field_names(format, fields)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    use_template = format != "text" and chat_template and getattr(tokenizer, "chat_template", None) is not None
    bos_id = tokenizer.bos_token_id
    bos = [bos_id] if not use_template and bos_id is not None and _adds_bos(tokenizer) else []
    ids_out, loss_out, too_long, empty = [], [], [], 0
    oversized = [r.where for r in records if format != "text" and _size(r.fields) > max_record_bytes]
    if oversized:
        records = [r for r in records if format == "text" or _size(r.fields) <= max_record_bytes]

    for lo in range(0, len(records), _CHUNK):
        chunk = records[lo:lo + _CHUNK]
        rendered = [_render(r, format, names, tokenizer, use_template, system_prompt, prompt_template)
                    for r in chunk]
        big = [len(text) > max_record_bytes // 4 and len(text.encode()) > max_record_bytes for text, _ in rendered]
        # One batched call for every whole rendering and every prefix that ends inside it.
        strings = []
        for (text, spans), large in zip(rendered, big):
            if not large:
                strings.append(text)
                strings += [text[:c] for c in _cuts(text, spans)]
        encoded = iter(tokenizer(strings, add_special_tokens=False)["input_ids"] if strings else [])
        for record, (text, spans), large in zip(chunk, rendered, big):
            if large:  # a text document (the others were skipped): its spans are (0, len), no prefixes
                full = [t for piece in _pieces(text, max_record_bytes // 4)
                        for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]
            else:
                full = next(encoded)
            at = {c: _common_prefix(full, next(encoded)) for c in _cuts(text, spans)}
            ids, loss = _with_loss(bos, full, eos, text, spans, at)
            starts = range(0, max(len(ids) - 1, 1), seq_len) if format == "text" else [0]
            pieces = [(ids[s:s + seq_len + 1], loss[s:s + seq_len + 1]) for s in starts]
            for piece_ids, piece_loss in pieces:
                if piece_loss[1:].any():
                    ids_out.append(piece_ids)
                    loss_out.append(piece_loss)
                elif loss[1:].any() and format != "text":
                    too_long.append(record.where)
                else:
                    empty += 1

    if oversized:
        log.warning("skipped %d record(s) of more than %d bytes, e.g. %s", len(oversized), max_record_bytes,
                    ", ".join(oversized[:5]))
    if too_long:
        log.warning("skipped %d record(s) whose prompt alone fills seq_len=%d, e.g. %s", len(too_long), seq_len,
                    ", ".join(too_long[:5]))
    lengths = np.array([len(x) for x in ids_out], np.int64)
    return Examples(
        ids=np.concatenate(ids_out) if ids_out else np.zeros(0, np.int32),
        loss=np.concatenate(loss_out) if loss_out else np.zeros(0, bool),
        starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        skipped_too_long=len(too_long), skipped_empty=empty, skipped_oversized=len(oversized))


def _size(value) -> int:
    """Bytes of the text in a record's fields (strings in nested lists and objects included)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 0


def _pieces(text: str, n: int) -> list[str]:
    """`text` cut into pieces of at most about `n` characters, each cut just before a space or line break
    that follows a non-space and precedes one (where byte-level BPE pre-tokenizers split), else anywhere."""
    out, lo = [], 0
    while len(text) - lo > n:
        hi = lo + n
        cut = max(text.rfind("\n", lo + 1, hi), text.rfind(" ", lo + 1, hi))
        while cut > lo and (text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()):
            cut = max(text.rfind("\n", lo + 1, cut), text.rfind(" ", lo + 1, cut))
        cut = cut if cut > lo else hi
        out.append(text[lo:cut])
        lo = cut
    out.append(text[lo:])
    return out


def _with_loss(bos: list[int], full: list[int], eos: int, text: str, spans, at: dict[int, int]):
    """(ids, loss): bos + full + EOS (unless full ends with it), and True on the tokens of each character
    span (`at` maps a character boundary inside the text to a token boundary of `full`); on the appended EOS
    when the last span reaches the end of the text."""
    at = {0: 0, len(text): len(full), **at}
    ids = bos + full
    loss = np.zeros(len(ids) + 1, bool)
    for a, b in spans:
        loss[len(bos) + at[a]:len(bos) + at[b]] = True
    if ids and ids[-1] == eos:
        return np.asarray(ids, np.int32), loss[:-1]
    loss[-1] = bool(spans) and spans[-1][1] == len(text)
    return np.asarray(ids + [eos], np.int32), loss


def seq2seq_texts(record: Record, names: dict, prompt_template: str) -> tuple[str, str]:
    """(prompt, target) of a seq2seq record: the template with "{source}" replaced by the source field, and the
    target field; CRLF line endings become LF (they are file artifacts, e.g. in SAMSum's CSV). `names` maps
    "source" and "target" to column names (see `field_names`). Raises DataError naming the record and field."""
    source = _string(record, names["source"]).replace("\r\n", "\n")
    target = _string(record, names["target"]).replace("\r\n", "\n")
    return prompt_template.replace("{source}", source), target


def prompt_ids(prompt: str, tokenizer, *, system_prompt: str = "", chat_template: bool = True) -> list[int]:
    """The token ids a seq2seq example's target follows in training (`tokenize_records`): the prompt as a user
    turn with the generation prompt under the tokenizer's chat template, or BOS (where the tokenizer adds one)
    and the prompt; what generation starts from."""
    if chat_template and getattr(tokenizer, "chat_template", None) is not None:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _render(record: Record, format: str, names: dict, tokenizer, use_template: bool, system_prompt: str,
            prompt_template: str):
    """(text, character spans that carry the loss)."""
    if format == "text":
        text = _string(record, names["text"])
        return text, [(0, len(text))]
    if format == "seq2seq":
        prompt, target = seq2seq_texts(record, names, prompt_template)
        if not use_template:  # the prompt, then the target: no instruction scaffolding
            return prompt + target, [(len(prompt), len(prompt) + len(target))]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
    else:
        messages = _alpaca(record, names) if format == "alpaca" else _messages(record, names)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if use_template:
        return _render_template(tokenizer, messages, record.where)
    return _render_plain(messages)


def _render_template(tokenizer, messages: list[dict], where: str):
    def render(msgs, generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors raised by the template itself (e.g. roles must alternate)
            raise DataError(f"{where}: the chat template rejected this conversation ({e})") from e

    full, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(messages[:i], generation_prompt=True)
        end = full if i == len(messages) - 1 else render(messages[:i + 1])
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise DataError(f"{where}: the chat template does not render message {i} as a prefix of the whole "
                            "conversation, so the response cannot be located (use chat_template=False)")
        spans.append((len(start), len(end)))
    return full, spans


def _render_plain(messages: list[dict]):
    text, spans = "", []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"])))
            text += m["content"] + ("\n\n" if i < len(messages) - 1 else "")
        elif m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        else:
            text += f"{m['content']}\n\n"
    return text, spans


def _alpaca(record: Record, names: dict) -> list[dict]:
    instruction = _string(record, names["instruction"])
    extra = _string(record, names["input"], required=False)
    output = _string(record, names["output"])
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _messages(record: Record, names: dict) -> list[dict]:
    field, where = names["messages"], record.where
    value = record.fields.get(field)
    if value is None:
        raise DataError(f"{where}: missing field '{field}'{_has(record)}")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{k}] must be an object with '{names['role']}' and '{names['content']}'")
        role, content = m.get(names["role"]), m.get(names["content"])
        if role not in _ROLES:
            raise DataError(f"{where}: {field}[{k}] has role {role!r} (expected system, user or assistant, "
                            f"in field '{names['role']}')")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{k}] field '{names['content']}' must be a string, "
                            f"got {type(content).__name__}")
        out.append({"role": _ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field '{field}' has no assistant message to train on")
    return out


def _string(record: Record, field: str, required: bool = True) -> str:
    value = record.fields.get(field)
    if value is None:
        if required:
            raise DataError(f"{record.where}: missing field '{field}'{_has(record)}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _has(record: Record) -> str:
    present = [k for k, v in record.fields.items() if v is not None]
    return f" (the record has: {', '.join(present)}; map names with `fields`)" if present else ""


def _cuts(text: str, spans) -> list[int]:
    """Span boundaries strictly inside the text: the prefixes that need their own tokenization."""
    return sorted({c for span in spans for c in span if 0 < c < len(text)})


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _adds_bos(tokenizer) -> bool:
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
