r"""
Generic JSONL (or JSON array) -> token bins for bipost. Training never tokenizes; this does it once, offline.

    python data/prepare.py --out_dir=data/mydata --tokenizer=/path/to/hf_model_dir --max_length=1024 \
        --truncation=truncate sft_train=train.jsonl pref_train=prefs.jsonl pref_val=prefs_val.jsonl

Records: every shape TRL's SFT, DPO and KTO trainers read (docs/data.md has an example of each), one JSON object per
line or all in one JSON array (a UTF-8 BOM and CRLF line ends are fine):
  SFT         {"text"}, {"prompt", "completion"} (strings or message lists), {"messages"} (the last, assistant's
              message is the response)
  preference  {"prompt", "chosen", "rejected"} (strings or message lists); {"chosen", "rejected"} alone, or beside
              a "prompt" string (UltraFeedback-binarized): the shared start of chosen and rejected is the prompt;
              optional "margin": a number per pair (TRL's column, read by the reward model), in every record or none
  prompt (RL) {"prompt"} or {"messages"}, plus any other fields (e.g. "answer"), kept in <split>_extra.jsonl
  unpaired    an SFT record with "label": true/false (TRL's KTO shape: true = desirable), kind 'unpaired'
Roles: system, user, assistant, tool, or one the chat template names; human -> user and gpt, bot, model ->
assistant are renamed (said once per split); any other role is refused.
A split is unpaired if its first record has "label"; a preference split if it has "chosen" or "rejected"; a prompt
split if its name starts with "rl" or "prompt", or its first record has "prompt" but no "completion"; else SFT (a
name must agree).

--tokenizer: 'demo' (the byte-level encoding below), a local Hugging Face tokenizer directory, or a cached tiktoken
name; nothing is downloaded. Trained tokens: string records are prompt = [BOS] + prompt, response = completion + EOS;
message records are rendered by the chat template, the response being the text after the prompt up to and including
the template's end-of-turn token (ChatML's <|im_end|>; the newline after it is not trained), then EOS unless that
token is EOS. No template: "role: content\n" lines, then "assistant: ", the response + EOS.
--truncation=truncate cuts the prompt's start, never a response (its EOS would go): an example whose response alone
does not fit beside 1 prompt token is dropped, with a warning; --truncation=drop drops every example too long.
Pairs whose chosen and rejected are identical are dropped, with a warning.

Output in --out_dir: <split>.bin (flat uint32 ids: prompt, then response(s)), <split>_index.npy (int64 [n, 3]
offset, prompt_len, response_len for SFT and unpaired; [n, 4] offset, prompt_len, chosen_len, rejected_len for
preferences, their margins, if any, in <split>_margin.npy (float32 [n]); [n, 2] offset, prompt_len for prompts),
<split>_extra.jsonl (prompts: their other fields; unpaired: {"label": bool}), one JSON object per kept example, and
meta.json (merged when splits are added later), which holds the tokenizer's identity: the trainer refuses a model
whose tokenizer differs.
"""
import os, re, sys, json, hashlib, argparse
import numpy as np

class DataError(Exception):
    """Bad input; the message is the user-facing explanation (file:line, what is wrong, how to fix)."""

SHAPES = ('SFT records need {"text": str}, {"prompt": str, "completion": str} (or both message lists) or {"messages": '
          '[{"role": str, "content": str}, ...]}; preference records need "chosen" and "rejected" (both strings or both '
          'message lists) and a "prompt" of the same kind, or no prompt (their shared start is the prompt); prompt (RL) '
          'records need {"prompt": str or a list of messages} or {"messages": [...]}, plus any other fields')
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # ShareGPT, Gemma
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one: a tokenizer

def demo_encoding():
    """Byte-level tiktoken encoding built in code: ids 0-255 are the bytes, 256 is <|endoftext|> (EOS and pad)."""
    import tiktoken
    return tiktoken.Encoding(name="bipost-demo-bytes", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})

def tiktoken_texts(enc):
    """The text of every id, as a Hugging Face tokenizer decodes a lone id (bytes that are no UTF-8 become U+FFFD)."""
    texts = []
    for i in range(enc.n_vocab):
        try:
            texts.append(enc.decode_single_token_bytes(i).decode("utf-8", "replace"))
        except KeyError:  # an unused id between the ranks and the special tokens
            texts.append("")
    return texts

class Tokenizer:
    """The few things prepare needs from a tokenizer: 'demo', a local HF directory or a tiktoken name."""
    def __init__(self, spec):
        self.bos, self.bos_id, self.template, self.template_source, self.end_of_turn = [], None, None, "", None
        self.positions = None  # the model's max positions, when the tokenizer directory is a model directory
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
            self.bos_id = hf.bos_token_id
            self.encode = lambda text: hf.encode(text, add_special_tokens=False)
            self.texts = lambda: hf.batch_decode([[i] for i in range(len(hf))], skip_special_tokens=False,
                                                 clean_up_tokenization_spaces=False)
            added = hf.encode("", add_special_tokens=True)
            self.bos = added[:1] if added[:1] == [hf.bos_token_id] else []  # keep BOS, never a trailing EOS/SEP
            if hf.chat_template:
                self.template_source = str(hf.chat_template)
                self.template = lambda messages, gen: hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                self.end_of_turn = self.find_end_of_turn(set(hf.added_tokens_decoder))
            config = os.path.join(spec, "config.json")
            if os.path.isfile(config):
                with open(config) as f:
                    config = json.load(f)
                self.positions = config.get("max_position_embeddings") or config.get("n_positions")  # (GPT-2's name)
            return
        if os.path.isfile(spec):
            raise DataError(f"tokenizer {spec} is a file; pass the directory that holds it (with tokenizer.json or the files "
                            "save_pretrained writes)")
        offline = ("data/prepare.py works offline: only a local Hugging Face tokenizer directory (e.g. the model's) or a "
                   "built-in encoding (demo, a cached tiktoken name) works; download a Hub tokenizer where there is "
                   "network (hf download ORG/NAME --local-dir DIR) and pass --tokenizer=DIR")
        if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", spec):  # relative path or Hub name: either way no such directory here
            raise DataError(f"tokenizer {spec!r} is no local directory (and a Hub name is not downloaded): {offline}")
        if os.sep in spec or "/" in spec or spec.startswith((".", "~")):  # a path, never a tiktoken name
            raise DataError(f"tokenizer directory {spec} does not exist; pass a local Hugging Face tokenizer directory "
                            "(e.g. the model's), or --tokenizer=demo")
        try:
            import tiktoken
            enc = demo_encoding() if spec == "demo" else tiktoken.get_encoding(spec)
        except Exception as e:  # tiktoken's message spans several lines (plugin list, version): keep its first
            raise DataError(f"tokenizer {spec!r} is not 'demo', not a local directory, and not a tiktoken encoding that loads "
                            f"offline ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); "
                            f"{offline} (or cache the tiktoken file first: TIKTOKEN_CACHE_DIR)") from None
        self.name, self.vocab_size, self.eos_id = enc.name, enc.n_vocab, enc.eot_token
        self.pad_id, self.encode = enc.eot_token, enc.encode_ordinary  # text that looks like a special token stays text
        self.texts = lambda: tiktoken_texts(enc)

    def find_end_of_turn(self, special_ids):
        """The special token that closes an assistant turn in the template (ChatML's <|im_end|>, Llama 3's <|eot_id|>),
        or None: a response ends there, as generation does."""
        try:
            text = self.template([{"role": "user", "content": "1"}, {"role": "assistant", "content": "bipost"}], False)
        except Exception:  # a template with other demands (roles, system): no end of turn known, EOS is appended
            return None
        after = self.encode(text[text.rfind("bipost") + len("bipost"):])
        return after[0] if after and after[0] in special_ids else None

    def identity(self):
        """What the trainer compares with the model's tokenizer: the text of every id (hashed) and the special ids."""
        texts = hashlib.sha256(json.dumps(self.texts()).encode()).hexdigest()
        return dict(vocab_size=self.vocab_size, vocab_sha256=texts, bos_id=self.bos_id, eos_id=self.eos_id,
                    pad_id=self.pad_id, end_of_turn_id=self.end_of_turn)

    def render(self, messages, generation_prompt, where):
        if not self.template:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if generation_prompt else "")
        try:
            return self.template(messages, generation_prompt)
        except Exception as e:  # the template's raise_exception: e.g. no system role, or roles must alternate
            raise DataError(f"{where}: the chat template refuses these messages ({type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:200]}); order the roles as the model's template "
                            "expects, or use string records") from None

def check_messages(messages, where, key, tok, renamed):
    """The messages with their roles checked; common aliases renamed (recorded in renamed, said once per split)."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f'{where}: "{key}" must be a non-empty list of {{"role": str, "content": str}} messages. {SHAPES}')
    if not "".join(m["content"] for m in messages).strip():
        raise DataError(f'{where}: "{key}" is empty; fill it in or remove the record')
    checked = []
    for m in messages:
        role = m["role"].strip().lower()
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            if f"'{m['role']}'" in tok.template_source or f'"{m["role"]}"' in tok.template_source:
                role = m["role"]  # the template names it (e.g. Llama 3.1's 'ipython')
            else:
                raise DataError(f'{where}: unknown chat role {m["role"]!r} in "{key}"; the template would write it as it '
                                f"is: use {', '.join(ROLES)} (human, gpt, bot, model are read as user/assistant)")
        if role != m["role"]:
            renamed[m["role"]] = role
        checked.append({**m, "role": role})
    return checked

def text_field(record, key, where):
    if not isinstance(record[key], str):
        raise DataError(f'{where}: "{key}" must be a string like the other fields (or all of them message '
                        f"lists), got {type(record[key]).__name__}")
    if not record[key].strip():
        raise DataError(f'{where}: "{key}" is empty; fill it in or remove the record')
    return record[key]

def shared_prompt(chosen, rejected, where):
    """TRL's implicit prompt: the longest shared start of chosen and rejected, whole texts or whole conversations."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n and chosen[n - 1] == " ":
        n -= 1  # "The sky is| blue." : the space belongs to the answer (TRL's extract_prompt)
    unit = "characters" if isinstance(chosen, str) else "messages"
    if n == 0:
        raise DataError(f'{where}: "chosen" and "rejected" differ from their first {unit[:-1]}, so they share no prompt; '
                        f'give the prompt as "prompt", or start both with the same prompt')
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if n == len(value):
            raise DataError(f'{where}: "{key}" is all shared prompt ({n} {unit} that the other one starts with too), '
                            'nothing is left as its answer; give the prompt as "prompt"')
        if unit == "messages" and value[n]["role"] != "assistant":
            raise DataError(f'{where}: "chosen" and "rejected" differ from message {n + 1} on, a {value[n]["role"]!r} '
                            'message: an implicit prompt ends where the answers start (an assistant message); make '
                            'both the same conversation up to the answer, or give "prompt"')
    return chosen[:n], [chosen[n:], rejected[n:]]

def fields(record, kind, where, tok, renamed):
    """Returns (prompt, [response, ...]): strings, or message lists for conversational records (no responses for
    prompt records)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}. {SHAPES}")
    messages = lambda key, value=None: check_messages(record[key] if value is None else value, where, key, tok, renamed)
    if kind == "prompt":
        key = "prompt" if "prompt" in record else "messages"
        if key not in record:
            raise DataError(f"{where}: missing key prompt for a prompt (RL) record (got keys: {', '.join(record) or 'none'}). "
                            f"{SHAPES}")
        if isinstance(record[key], list):
            return messages(key), []
        if not isinstance(record[key], str):
            raise DataError(f'{where}: "{key}" must be a string or a list of messages, got {type(record[key]).__name__}')
        return text_field(record, key, where), []
    if kind == "sft" and "label" in record:
        raise DataError(f'{where}: "label" makes this an unpaired record (TRL\'s KTO shape), but the split\'s first record '
                        'has none, so the split is SFT: give every record a "label" (true/false) for the kto objective, '
                        'or drop "label" to train on every completion')
    if kind == "sft" and "messages" in record:
        conversation = messages("messages")
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            raise DataError(f'{where}: "messages" must end with an assistant message (the response) after at least one '
                            "prompt message")
        messages("messages[-1] (the response)", conversation[-1:])
        return conversation[:-1], [conversation[-1:]]
    if kind == "sft" and "text" in record and "prompt" not in record:  # language modeling: every token is trained
        return "", [text_field(record, "text", where)]
    keys = ("prompt", "chosen", "rejected") if kind == "pref" else ("prompt", "completion")
    missing = [k for k in keys if k not in record and (k != "prompt" or kind == "sft")]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)} for a {kind} record (got keys: "
                        f"{', '.join(record) or 'none'}). {SHAPES}")
    if kind == "pref" and ("prompt" not in record or isinstance(record["prompt"], str) and isinstance(record["chosen"], list)):
        if isinstance(record["chosen"], list):  # implicit prompt (UltraFeedback's "prompt" string is that user turn)
            return shared_prompt(messages("chosen"), messages("rejected"), where)
        return shared_prompt(text_field(record, "chosen", where), text_field(record, "rejected", where), where)
    if isinstance(record["prompt"], list):
        return messages("prompt"), [messages(k) for k in keys[1:]]
    return text_field(record, "prompt", where), [text_field(record, k, where) for k in keys[1:]]

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
    prompt_text, response_ids = tok.render(prompt, True, where), []
    for response in responses:
        full = tok.render(prompt + response, False, where)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template renders the prompt differently once a response follows, so the "
                            "prompt is not a prefix of prompt+response; use a template without that behaviour or string records")
        ids = tok.encode(full[len(prompt_text):])
        if not ids:
            raise DataError(f"{where}: the response is empty after applying the chat template; check the template")
        if tok.end_of_turn in ids:  # the turn ends there: what the template writes after it is never generated
            ids = ids[:len(ids) - ids[::-1].index(tok.end_of_turn)]
        if ids[-1] != tok.eos_id:  # (an end of turn that is not EOS too gets EOS: generation stopping at EOS stops)
            ids = ids + [tok.eos_id]
        response_ids.append(ids)
    return ([] if tok.template else tok.bos) + tok.encode(prompt_text), response_ids

def fit(prompt, responses, max_length, truncation):
    """Returns (prompt, responses, truncated), or None when the example is dropped. Only the prompt is ever cut."""
    longest = max(map(len, responses), default=0)  # a prompt record: the prompt alone must fit
    if len(prompt) + longest <= max_length:
        return prompt, responses, False
    room = max_length - longest  # prompt tokens that fit beside the longest response
    if truncation == "drop" or room < min(1, len(prompt)):
        return None
    return prompt[len(prompt) - room:], responses, True  # keep the prompt's end: the question sits next to the answer

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
    tokens, index, stats, extra = [], [], dict(examples=0, tokens=0, truncated=0, dropped=0), []
    identical, too_long, renamed = [], [], {}
    margins = kind == "pref" and isinstance(first, dict) and "margin" in first
    for where, record in records:
        if kind == "pref" and isinstance(record, dict) and "chosen" in record and record["chosen"] == record.get("rejected"):
            identical.append(where)  # (an implicit prompt would find no answer in them)
            stats["dropped"] += 1
            continue
        margin = pair_margin(record, where, margins) if kind == "pref" and isinstance(record, dict) else None
        fitted = fit(*encode(*fields(record, kind, where, tok, renamed), tok, where), max_length, truncation)
        if fitted and kind == "pref" and fitted[1][0] == fitted[1][1]:  # e.g. a template that trims "yes " to "yes"
            identical.append(where)
            fitted = None
        elif fitted is None and truncation == "truncate":
            too_long.append(where)
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
    if renamed:
        print(f"note: {name}: chat roles renamed: {', '.join(f'{a!r} -> {b!r}' for a, b in renamed.items())}")
    if identical:
        print(f"warning: {name}: dropped {len(identical)} pair(s) whose chosen and rejected are identical (first: {identical[0]})")
    if too_long:
        print(f"warning: {name}: dropped {len(too_long)} example(s) whose response alone is longer than max_length - 1 = "
              f"{max_length - 1} tokens (first: {too_long[0]}); a response is never cut (the model would learn not to stop)")
    if not index:
        raise DataError(f"{source if isinstance(source, str) else f'<{name}>'}: every example of split {name!r} was dropped; "
                        "raise --max_length" + (" or use --truncation=truncate" if truncation == "drop" else ""))
    return kind, np.array(tokens, dtype=np.uint32), np.array(index, dtype=np.int64), stats, extra

def build_unpaired_split(name, records, tok, max_length, truncation):
    """TRL's unpaired shape: an SFT record (prompt + completion, or messages) with a boolean "label" (true: a
    desirable completion); returns build_split's tuple, each label as {"label": bool} in extra."""
    tokens, index, stats, extra, renamed = [], [], dict(examples=0, tokens=0, truncated=0, dropped=0), [], {}
    for where, record in records:
        if not isinstance(record, dict) or "label" not in record:
            raise DataError(f'{where}: missing key label for an unpaired record (split {name!r}: its first record has '
                            f'one); give every record "label": true (desirable) or false (undesirable). {SHAPES}')
        if not isinstance(record["label"], bool):
            raise DataError(f'{where}: "label" must be true or false (JSON booleans), got {record["label"]!r}; write '
                            f'true for a desirable completion, false for an undesirable one')
        fitted = fit(*encode(*fields({k: v for k, v in record.items() if k != "label"}, "sft", where, tok, renamed), tok,
                             where), max_length, truncation)
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
    if renamed:
        print(f"note: {name}: chat roles renamed: {', '.join(f'{a!r} -> {b!r}' for a, b in renamed.items())}")
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
    if tok.positions and max_length > tok.positions:
        print(f"warning: --max_length={max_length} is more than the model's {tok.positions} positions (max_position_embeddings "
              f"in {tok.name}/config.json): the trainer refuses a split whose examples are longer; use --max_length={tok.positions}")
    meta = dict(vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id, tokenizer=tok.name,
                tokenizer_identity=tok.identity(), max_length=max_length, splits={})
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("tokenizer_identity", meta["tokenizer_identity"]) != meta["tokenizer_identity"] or \
                any(old.get(k) != meta[k] for k in ("tokenizer", "vocab_size", "eos_id", "pad_id")):
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
    print(f"{out_dir}: tokenizer {tok.name} (vocab {tok.vocab_size}, eos {tok.eos_id}, end of turn {tok.end_of_turn}), "
          f"max_length {max_length}, {truncation}")
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
