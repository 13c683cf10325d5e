"""
Generic JSONL (or JSON array) -> token bins for bipost. Training never tokenizes; this does it once, offline.

    python data/prepare.py --out_dir=data/mydata --tokenizer=/path/to/hf_model_dir --max_length=1024 \
        --truncation=truncate sft_train=train.jsonl pref_train=prefs.jsonl pref_val=prefs_val.jsonl

Records (the shapes TRL uses), one JSON object per line (JSON Lines) or all in one JSON array, as Hugging Face
datasets' JSON loader reads them (a UTF-8 BOM and CRLF line ends are fine):
  SFT         {"prompt": str, "completion": str}   or   {"messages": [{"role": .., "content": ..}, ...]}
              (messages: the last message must be the assistant's; it is the response, the rest the prompt)
  preference  {"prompt": str, "chosen": str, "rejected": str}, or prompt/chosen/rejected each a message list;
              optional "margin": a number per pair (TRL's column, read by the reward model), in every record or none
  prompt (RL) {"prompt": str or a message list, ...any other fields}   or   {"messages": [...], ...}  (TRL's GRPO
              shape): the other fields (e.g. "answer") are kept for the reward function, in <split>_extra.jsonl
  unpaired    {"prompt": str, "completion": str, "label": true/false}, prompt/completion message lists, or
              {"messages": [...], "label": ...} (TRL's KTO shape: label true = desirable), kind 'unpaired'
Split kind rule: a split is unpaired if its first record has "label"; a preference split if it has "chosen" or
"rejected"; a prompt split if
its name starts with "rl" or "prompt", or its first record has "prompt" but no "completion"; else SFT. A split
name starting with "sft", "pref", "rl" or "prompt" must agree with that.

Tokenizer (--tokenizer): 'demo' (the byte-level encoding below, built in code), a local Hugging Face
tokenizer directory, or a tiktoken built-in name that is already cached (nothing is downloaded). String
records: prompt = [BOS if the tokenizer adds one] + prompt, response = completion + EOS. Message records:
the chat template renders the prompt (with the generation prompt) and prompt+response; the response is
the rendered text after the prompt, plus EOS unless the template already put it there. Without a chat
template the messages are rendered as "role: content\\n" lines followed by "assistant: ".

Output in --out_dir: <split>.bin (flat uint32 ids: prompt, then response(s)), <split>_index.npy
(int64 [n, 3] offset, prompt_len, response_len for SFT; [n, 4] offset, prompt_len, chosen_len,
rejected_len for preferences, their margins, if any, in <split>_margin.npy (float32 [n]); [n, 2] offset, prompt_len
for prompts, whose other fields go to <split>_extra.jsonl, one JSON object per kept example; [n, 3] for unpaired, the
labels in <split>_extra.jsonl as {"label": bool}) and meta.json (merged when splits are added later).
Prompt tokens are never scored by the trainer, so masking is by construction.
--truncation=truncate: cut the prompt from the left (down to 1 token), then the response's end;
--truncation=drop: drop examples longer than max_length. Pairs whose chosen and rejected tokens are
identical (after truncation) carry no preference signal: they are dropped with a warning.
"""
import os, sys, json, argparse
import numpy as np

class DataError(Exception):
    """Bad input; the message is the user-facing explanation (file:line, what is wrong, how to fix)."""

SHAPES = ('SFT records need {"prompt": str, "completion": str} or {"messages": [{"role": str, "content": str}, ...]}; '
          'preference records need {"prompt", "chosen", "rejected"}, each a string or each a list of messages; '
          'prompt (RL) records need {"prompt": str or a list of messages} or {"messages": [...]}, plus any other fields')

def demo_encoding():
    """Byte-level tiktoken encoding built in code: ids 0-255 are the bytes, 256 is <|endoftext|> (EOS and pad)."""
    import tiktoken
    return tiktoken.Encoding(name="bipost-demo-bytes", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})

class Tokenizer:
    """The few things prepare needs from a tokenizer: 'demo', a local HF directory or a tiktoken name."""
    def __init__(self, spec):
        self.bos, self.template = [], None
        spec = os.path.expanduser(spec)  # --tokenizer=~/model: the shell leaves a ~ after '=' as it is
        if os.path.isdir(spec):
            try:
                from transformers import AutoTokenizer
                hf = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            except Exception as e:
                raise DataError(f"could not load a Hugging Face tokenizer from directory {spec} ({type(e).__name__}: {e}); "
                                "it needs tokenizer.json or the tokenizer files save_pretrained writes") from None
            if hf.eos_token_id is None:
                raise DataError(f"{spec}: the tokenizer has no eos_token; set one in tokenizer_config.json")
            self.name, self.vocab_size, self.eos_id = os.path.abspath(spec), len(hf), hf.eos_token_id
            self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
            self.encode = lambda text: hf.encode(text, add_special_tokens=False)
            added = hf.encode("", add_special_tokens=True)
            self.bos = added[:1] if added[:1] == [hf.bos_token_id] else []  # keep BOS, never a trailing EOS/SEP
            if hf.chat_template:
                self.template = lambda messages, gen: hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            return
        if os.path.isfile(spec):
            raise DataError(f"tokenizer {spec} is a file; pass the directory that holds it (with tokenizer.json or the files "
                            "save_pretrained writes)")
        if os.sep in spec or "/" in spec or spec.startswith((".", "~")):  # a path, never a tiktoken name
            raise DataError(f"tokenizer directory {spec} does not exist; pass a local Hugging Face tokenizer directory "
                            "(e.g. the model's), or --tokenizer=demo")
        try:
            import tiktoken
            enc = demo_encoding() if spec == "demo" else tiktoken.get_encoding(spec)
        except Exception as e:  # tiktoken's message spans several lines (plugin list, version): keep its first
            raise DataError(f"tokenizer {spec!r} is not 'demo', not a local directory, and not a tiktoken encoding that loads "
                            f"offline ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); "
                            "pass --tokenizer=demo, a local Hugging Face tokenizer directory, or cache the tiktoken file "
                            "first (TIKTOKEN_CACHE_DIR)") from None
        self.name, self.vocab_size, self.eos_id = enc.name, enc.n_vocab, enc.eot_token
        self.pad_id, self.encode = enc.eot_token, enc.encode_ordinary  # text that looks like a special token stays text

    def render(self, messages, generation_prompt):
        if self.template:
            return self.template(messages, generation_prompt)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if generation_prompt else "")

def check_messages(messages, where, key):
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f'{where}: "{key}" must be a non-empty list of {{"role": str, "content": str}} messages. {SHAPES}')
    if not "".join(m["content"] for m in messages).strip():
        raise DataError(f'{where}: "{key}" is empty; fill it in or remove the record')
    return messages

def fields(record, kind, where):
    """Returns (prompt, [response, ...]): strings, or message lists for conversational records (no responses for
    prompt records)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}. {SHAPES}")
    if kind == "prompt":
        key = "prompt" if "prompt" in record else "messages"
        if key not in record:
            raise DataError(f"{where}: missing key prompt for a prompt (RL) record (got keys: {', '.join(record) or 'none'}). "
                            f"{SHAPES}")
        if isinstance(record[key], list):
            return check_messages(record[key], where, key), []
        if not isinstance(record[key], str):
            raise DataError(f'{where}: "{key}" must be a string or a list of messages, got {type(record[key]).__name__}')
        if not record[key].strip():
            raise DataError(f'{where}: "{key}" is empty; fill it in or remove the record')
        return record[key], []
    if kind == "sft" and "messages" in record:
        messages = check_messages(record["messages"], where, "messages")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(f'{where}: "messages" must end with an assistant message (the response) after at least one '
                            "prompt message")
        check_messages(messages[-1:], where, "messages[-1] (the response)")
        return messages[:-1], [messages[-1:]]
    keys = ("prompt", "chosen", "rejected") if kind == "pref" else ("prompt", "completion")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)} for a {kind} record (got keys: "
                        f"{', '.join(record) or 'none'}). {SHAPES}")
    conversational = isinstance(record["prompt"], list)
    for k in keys:
        if conversational:
            check_messages(record[k], where, k)
        elif not isinstance(record[k], str):
            raise DataError(f'{where}: "{k}" must be a string like "prompt" (or every field a message list), '
                            f"got {type(record[k]).__name__}")
        elif not record[k].strip():
            raise DataError(f'{where}: "{k}" is empty; fill it in or remove the record')
    return record["prompt"], [record[k] for k in keys[1:]]

def pair_margin(record, where, expected):
    """A preference record's "margin" as a float (None without one); expected: whether the split's first record has one."""
    if ("margin" in record) != expected:
        here, first = ("missing", "present") if expected else ("present", "missing")
        raise DataError(f'{where}: "margin" is {here} here but {first} in the first record: TRL\'s margin column holds a '
                        'number for every pair; add it everywhere or nowhere')
    value = record.get("margin")
    if expected and (isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value)):
        raise DataError(f'{where}: "margin" must be a finite number (how much more the chosen response is preferred), '
                        f'got {value!r}')
    return float(value) if expected else None

def encode(prompt, responses, tok, where):
    """Token ids of the prompt and of each response; stored back to back, so the prompt is a prefix by construction."""
    if isinstance(prompt, str):
        return tok.bos + tok.encode(prompt), [tok.encode(r) + [tok.eos_id] for r in responses]
    prompt_text, response_ids = tok.render(prompt, True), []
    for response in responses:
        full = tok.render(prompt + response, False)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template renders the prompt differently once a response follows, so the "
                            "prompt is not a prefix of prompt+response; use a template without that behaviour or string records")
        ids = tok.encode(full[len(prompt_text):])
        if not ids:
            raise DataError(f"{where}: the response is empty after applying the chat template; check the template")
        response_ids.append(ids if tok.eos_id in ids else ids + [tok.eos_id])
    return ([] if tok.template else tok.bos) + tok.encode(prompt_text), response_ids

def fit(prompt, responses, max_length, truncation):
    """Returns (prompt, responses, truncated), or None when the example is dropped."""
    longest = max(map(len, responses), default=0)  # a prompt record: the prompt alone must fit
    if len(prompt) + longest <= max_length:
        return prompt, responses, False
    if truncation == "drop":
        return None
    prompt = prompt[-max(1, max_length - longest):]  # keep the prompt's end: the question sits next to the answer
    return prompt, [r[:max_length - len(prompt)] for r in responses], True

def read_records(path):
    """[(where, record)] from JSON Lines (where = 'file:line') or from one JSON array of records (where =
    'file: record i of n'), the two layouts Hugging Face datasets' JSON loader reads. A UTF-8 BOM and CRLF
    line ends (files saved on Windows) are accepted."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # the BOM some Windows editors put first
    try:
        text = data.decode("utf-8")  # CRLF needs nothing: JSON reads the \r before each \n as whitespace
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; re-save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": the first line is a whole value, so the file is JSON Lines
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); a file starting with '[' "
                                "must hold one JSON array of records, e.g. [{\"prompt\": \"...\", \"completion\": \"...\"}]") from None
        else:
            if not array:
                raise DataError(f"{path}: the JSON array is empty; it needs at least one record")
            return [(f"{path}: record {i} of {len(array)}", r) for i, r in enumerate(array, 1)]
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); each line must hold one JSON "
                                "object, e.g. {\"prompt\": \"...\", \"completion\": \"...\"} (or the whole file one "
                                "JSON array of such objects)") from None
    if not records:
        raise DataError(f"{path}: the file is empty; it needs one JSON object per line")
    return records

def build_split(name, source, tok, max_length, truncation):
    records = read_records(source) if isinstance(source, str) else [(f"<{name}>:{i}", r) for i, r in enumerate(source, 1)]
    if not records:
        raise DataError(f"<{name}>: no records")
    first, words = records[0][1], {"sft": "an SFT", "pref": "a preference", "prompt": "a prompt (RL)"}
    if isinstance(first, dict) and "label" in first:  # TRL's unpaired (KTO) shape
        return build_unpaired_split(name, records, tok, max_length, truncation)
    kind = "sft"
    if isinstance(first, dict) and ("chosen" in first or "rejected" in first):
        kind = "pref"
    elif name.startswith(("rl", "prompt")) or isinstance(first, dict) and "prompt" in first and "completion" not in first:
        kind = "prompt"
    named = next((k for k, prefixes in (("sft", ("sft",)), ("pref", ("pref",)), ("prompt", ("rl", "prompt")))
                  if name.startswith(prefixes)), kind)
    if named != kind:
        raise DataError(f"{records[0][0]}: split {name!r} is named like {words[named]} split but "
                        f"its first record is {words[kind]} record. {SHAPES}")
    tokens, index, stats, identical, extra = [], [], dict(examples=0, tokens=0, truncated=0, dropped=0), [], []
    margins = kind == "pref" and isinstance(first, dict) and "margin" in first
    for where, record in records:
        margin = pair_margin(record, where, margins) if kind == "pref" and isinstance(record, dict) else None
        fitted = fit(*encode(*fields(record, kind, where), tok, where), max_length, truncation)
        if fitted and kind == "pref" and fitted[1][0] == fitted[1][1]:
            identical.append(where)
            fitted = None
        if fitted is None:
            stats["dropped"] += 1
            continue
        prompt, responses, truncated = fitted
        if kind == "prompt":  # what the reward function reads (e.g. "answer"), aligned with the index rows
            extra.append({k: v for k, v in record.items() if k not in ("prompt", "messages")})
        elif margins:  # a preference split's margins, aligned with the index rows too
            extra.append(margin)
        index.append([stats["tokens"], len(prompt)] + [len(r) for r in responses])
        for ids in [prompt] + responses:
            tokens.extend(ids)
            stats["tokens"] += len(ids)
        stats["examples"] += 1
        stats["truncated"] += truncated
    if identical:
        print(f"warning: {name}: dropped {len(identical)} pair(s) whose chosen and rejected are identical (first: {identical[0]})")
    if not index:
        raise DataError(f"{source if isinstance(source, str) else f'<{name}>'}: every example of split {name!r} was dropped; "
                        "raise --max_length or use --truncation=truncate")
    return kind, np.array(tokens, dtype=np.uint32), np.array(index, dtype=np.int64), stats, extra

def build_unpaired_split(name, records, tok, max_length, truncation):
    """TRL's unpaired shape: an SFT record (prompt + completion, or messages) with a boolean "label" (true: a
    desirable completion); returns build_split's tuple, each label as {"label": bool} in extra."""
    tokens, index, stats, extra = [], [], dict(examples=0, tokens=0, truncated=0, dropped=0), []
    for where, record in records:
        if not isinstance(record, dict) or "label" not in record:
            raise DataError(f'{where}: missing key label for an unpaired record (split {name!r}: its first record has '
                            f'one); give every record "label": true (desirable) or false (undesirable). {SHAPES}')
        if not isinstance(record["label"], bool):
            raise DataError(f'{where}: "label" must be true or false (JSON booleans), got {record["label"]!r}; write '
                            f'true for a desirable completion, false for an undesirable one')
        fitted = fit(*encode(*fields({k: v for k, v in record.items() if k != "label"}, "sft", where), tok, where),
                     max_length, truncation)
        if fitted is None:
            stats["dropped"] += 1
            continue
        prompt, (completion,), truncated = fitted
        index.append([stats["tokens"], len(prompt), len(completion)])
        extra.append({"label": record["label"]})
        tokens.extend(prompt + completion)
        stats["tokens"] += len(prompt) + len(completion)
        stats["examples"] += 1
        stats["truncated"] += truncated
    if not index:
        raise DataError(f"every example of split {name!r} was dropped; raise --max_length or use --truncation=truncate")
    return "unpaired", np.array(tokens, dtype=np.uint32), np.array(index, dtype=np.int64), stats, extra

def prepare(out_dir, tokenizer, splits, max_length=1024, truncation="truncate"):
    """Tokenizes splits {name: JSON Lines / JSON array path, or list of records} into out_dir; returns meta.
    Nothing is written on error."""
    out_dir = os.path.expanduser(out_dir)  # not a directory literally named ~
    if truncation not in ("truncate", "drop"):
        raise DataError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    if max_length < 2:
        raise DataError(f"max_length={max_length} leaves no room for 1 prompt token and 1 response token; use >= 2")
    tok = Tokenizer(tokenizer)
    meta = dict(vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id, tokenizer=tok.name,
                max_length=max_length, splits={})
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if any(old.get(k) != meta[k] for k in ("tokenizer", "vocab_size", "eos_id", "pad_id")):
            raise DataError(f"{meta_path}: existing splits use tokenizer {old.get('tokenizer')!r} (vocab {old.get('vocab_size')}), "
                            f"not {tok.name!r} (vocab {tok.vocab_size}); one directory holds one tokenizer: "
                            "use another --out_dir or re-prepare every split")
        meta["splits"], meta["max_length"] = old["splits"], max(old["max_length"], max_length)
    built = {name: build_split(name, source, tok, max_length, truncation) for name, source in splits.items()}
    os.makedirs(out_dir, exist_ok=True)
    renames = []
    for name, (kind, tokens, index, stats, extra) in built.items():
        bin_path, index_path = os.path.join(out_dir, f"{name}.bin"), os.path.join(out_dir, f"{name}_index.npy")
        tokens.tofile(bin_path + ".tmp")
        with open(index_path + ".tmp", "wb") as f:
            np.save(f, index)
        renames += [bin_path, index_path]
        if kind in ("prompt", "unpaired"):
            extra_path = os.path.join(out_dir, f"{name}_extra.jsonl")
            with open(extra_path + ".tmp", "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in extra)
            renames.append(extra_path)
        margin_path = os.path.join(out_dir, f"{name}_margin.npy")
        if kind == "pref" and extra:
            with open(margin_path + ".tmp", "wb") as f:
                np.save(f, np.array(extra, dtype=np.float32))
            renames.append(margin_path)
        elif os.path.exists(margin_path):  # an earlier preparation's margins would be read with these pairs
            os.remove(margin_path)
        meta["splits"][name] = dict(kind=kind, **stats, max_length=max_length)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    for path in renames + [meta_path]:  # meta.json last: it only ever describes complete files
        os.replace(path + ".tmp", path)
    print(f"{out_dir}: tokenizer {tok.name} (vocab {tok.vocab_size}, eos {tok.eos_id}), max_length {max_length}, {truncation}")
    for name, (kind, tokens, index, stats, _) in built.items():
        print(f"  {name:<18} {kind:<4} {stats['examples']:>8,} examples {stats['tokens']:>11,} tokens  truncated "
              f"{stats['truncated']:,}  dropped {stats['dropped']:,}  {tokens.nbytes / 1e6:.2f} MB")
    return meta

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="dataset directory, e.g. data/mydata")
    parser.add_argument("--tokenizer", required=True, help="'demo', a local HF tokenizer dir, or a cached tiktoken name")
    parser.add_argument("--max_length", type=int, default=1024, help="prompt + response never exceeds this")
    parser.add_argument("--truncation", default="truncate", choices=["truncate", "drop"])
    parser.add_argument("splits", nargs="+", metavar="split=file.jsonl", help="e.g. sft_train=train.jsonl")
    args = parser.parse_args()
    try:
        if bad := [s for s in args.splits if "=" not in s or not s.split("=", 1)[0] or not s.split("=", 1)[1]]:
            raise DataError(f"{bad[0]!r}: splits are given as name=path.jsonl, e.g. sft_train=train.jsonl")
        prepare(args.out_dir, args.tokenizer, dict(s.split("=", 1) for s in args.splits), args.max_length, args.truncation)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
