"""
Reads what data/prepare.py writes, for the trainer: one Split per <split>.bin + <split>_index.npy.

Every rank walks the same seeded per-epoch permutation and takes its own slice of each global batch,
so the data order depends only on (seed, epoch, cursor): a resumed run sees exactly the examples the
killed run would have seen. Bad files raise DataError with the path and the fix.
"""
import hashlib
import json
import os

import numpy as np
import torch

from data.prepare import TOKENIZER_FILES, DataError, Tokenizer

COLUMNS = {'sft': 3, 'pref': 4, 'prompt': 2, 'unpaired': 3}  # index columns: offset, prompt_len, one length per response
KINDS = {3: 'an SFT', 4: 'a preference', 2: 'a prompt (RL)'}  # what a split with that many columns is


def resolve_dataset(dataset, root='data'):
    """The directory of config key `dataset`: a name under data/ ('demo'), or a directory path holding meta.json
    ('data/demo', 'data/demo/', '/abs/dir', even '.../meta.json'), so a path typed by shell completion works too."""
    if not dataset:  # a recipe for a user's model leaves it unset rather than train on the demo's byte-level data
        raise DataError("dataset is not set: pass --dataset=DIR, a directory written by python data/prepare.py "
                        "--tokenizer=<your model dir> --out_dir=DIR ... (or --dataset=demo for the demo, with "
                        "init_from='scratch')")
    path = os.path.normpath(os.path.expanduser(dataset))  # the shell leaves --dataset=~/x as it is
    if os.path.basename(path) == 'meta.json' and os.path.isfile(path):
        path = os.path.dirname(path) or '.'
    for candidate in (os.path.join(root, path), path):  # the name under data/ first: --dataset=demo as before
        if os.path.isfile(os.path.join(candidate, 'meta.json')):
            return candidate
    known = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, 'meta.json'))) \
        if os.path.isdir(root) else []
    wanted = path if os.path.isabs(path) or os.sep in path else os.path.join(root, path)
    raise DataError(f"{os.path.join(wanted, 'meta.json')} not found (dataset={dataset!r}): prepare the data first "
                    f"(python data/prepare.py --out_dir={wanted} ..., or python data/demo/prepare.py for the demo), "
                    f"or set dataset to a name under {root}/ ({', '.join(known) or 'none prepared'}) or a directory "
                    f"holding meta.json")


def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise DataError(f"{path} not found: prepare the data first (python data/prepare.py --out_dir={data_dir} ..., "
                        f"or python data/demo/prepare.py for the demo)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): prepare the data again") from None
    missing = [k for k in ('vocab_size', 'eos_id', 'pad_id', 'tokenizer', 'splits') if k not in meta] \
        if isinstance(meta, dict) else ['all keys']
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: it was not written by data/prepare.py; prepare the data again")
    return meta


def check_meta(meta, vocab_size, path):
    """eos_id and pad_id must be token ids of a vocabulary of vocab_size: a pad id outside it would crash the
    embedding lookup deep inside transformers at the first batch."""
    for key in ('eos_id', 'pad_id'):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise DataError(f"{path}: {key}={value!r} is outside the vocabulary 0..{vocab_size - 1}: set {key} to the "
                            f"tokenizer's id (its {'eos' if key == 'eos_id' else 'pad (or eos)'} token), or prepare the "
                            f"data again with the model's tokenizer")


def check_tokenizer(meta, meta_path, init_from, role='policy'):
    """The data must come from the policy's own tokenizer: from another one it trains without any error as long as the
    ids fit the vocabulary, on text the model reads as noise. A scratch model is built for the data's tokenizer and a
    resumed run was checked when it started: nothing to check. The frozen reference and KD teacher (role) read the
    same ids, so the text of each id must match too; their special ids may differ (a base teacher's EOS). Returns a
    warning where the check cannot be made."""
    if init_from in ('scratch', 'resume') or not os.path.isdir(init_from):  # (a missing dir: the model loader says so)
        return ''
    data = meta.get('tokenizer_identity')
    if data is None:  # refusing would strand every dataset prepared before the identity existed
        return (f"warning: {meta_path} has no tokenizer_identity (an older data/prepare.py wrote it): only its vocabulary "
                f"size is checked against {init_from}; prepare the data again to check its tokenizer")
    exported = os.path.join(init_from, 'bipost_data_meta.json')  # a bipost export of a scratch model: its data's tokenizer
    if any(os.path.isfile(os.path.join(init_from, name)) for name in TOKENIZER_FILES):
        try:
            model = Tokenizer(init_from).identity()
        except DataError as e:  # the model itself may still load: the trainer never tokenizes
            return f"warning: {e}; so the data's tokenizer is checked against {init_from} by vocabulary size only"
    elif os.path.isfile(exported):
        with open(exported) as f:
            model = json.load(f).get('tokenizer_identity')
    else:
        model = None
    if model is None:
        return (f"warning: {init_from} has no tokenizer files: the data's tokenizer ({meta['tokenizer']}) is checked "
                f"against it by vocabulary size only")
    keys = data if role == 'policy' else ('vocab_size', 'vocab_sha256')
    differs = ['the text of its ids' if key == 'vocab_sha256' else f"{key} {data[key]} vs {model.get(key)}"
               for key in keys if data[key] != model.get(key)]
    if differs and role != 'policy':
        raise DataError(f"{role}_from={init_from}: its tokenizer is not the data's ({meta['tokenizer']}; "
                        f"{', '.join(differs)} differ), so it would score other text than the policy reads: the {role} "
                        f"must share the policy's tokenizer (the same model family and vocabulary)")
    if differs:
        raise DataError(f"{meta_path}: the data was prepared with tokenizer {meta['tokenizer']}, not with {init_from}'s "
                        f"({', '.join(differs)} differ): re-run python data/prepare.py --tokenizer={init_from} with a new "
                        f"--out_dir=DIR, and train with --dataset=DIR")
    return ''


def file_digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            h.update(block)
    return h.hexdigest()


class Split:
    """One split: memmapped tokens + index, batched as padded tensors with a response mask."""

    def __init__(self, data_dir, name, kind, meta, seed, rank=0, world_size=1, device='cpu', keep=None, keep_source='',
                 key='train_splits/val_splits'):
        self.name, self.kind, self.meta, self.seed = name, kind, meta, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        path = os.path.join(data_dir, name)
        for suffix in ('.bin', '_index.npy'):
            if not os.path.exists(path + suffix):
                ready = sorted(n for n, s in meta['splits'].items() if s.get('kind') == kind and
                               all(os.path.exists(os.path.join(data_dir, n + x)) for x in ('.bin', '_index.npy')))
                raise DataError(f"{path + suffix} not found: split '{name}' was not prepared; prepare it, or set "
                                f"{key} to one of the {kind} splits in {data_dir}: {ready}")
        if os.path.getsize(path + '.bin') == 0:  # (numpy cannot memmap an empty file)
            raise DataError(f"{path}.bin is empty: split '{name}' has no examples; prepare it with data, or set {key} "
                            f"to another split")
        prepared = meta['splits'].get(name, {}).get('kind')
        if 'unpaired' in (kind, prepared) and prepared != kind:  # its index looks like SFT's: the kind in meta.json tells
            raise DataError(f"split '{name}' in {data_dir} holds {prepared} data, but {key} gives it to an objective "
                            f"that reads {kind} data: set {key} to a {kind} split")
        self.tokens = np.memmap(path + '.bin', dtype=np.uint32, mode='r')
        self.index = np.load(path + '_index.npy')
        if self.index.ndim != 2 or self.index.shape[1] != COLUMNS[kind]:
            raise DataError(f"{path}_index.npy has shape {self.index.shape}, but objective data of kind '{kind}' needs "
                            f"[n, {COLUMNS[kind]}]: is '{name}' {KINDS.get(self.index.shape[-1], 'another kind of')} split?")
        expected = self.index[-1, 0] + self.index[-1, 1:].sum() if len(self.index) else 0
        if expected != len(self.tokens):
            raise DataError(f"{path}.bin holds {len(self.tokens)} tokens, not the {expected} that {path}_index.npy "
                            f"describes: a truncated copy or files from different runs; prepare the split again")
        self.ids = np.arange(len(self.index)) if keep is None else np.asarray(keep, dtype=np.int64)
        if len(self.ids) and not 0 <= self.ids.min() <= self.ids.max() < len(self.index):
            raise DataError(f"keep_list {keep_source} holds ids outside 0..{len(self.index) - 1} of split '{name}': "
                            f"it was made for another split; set keep_objective or run the data selector again")
        self.epoch, self.cursor, self._epoch = 0, 0, None
        self.max_tokens = 0  # > 0 (max_tokens_per_batch, set by run_splits): micro-batches filled up to this many tokens
        self.path = path
        # tokens of the longest row (prompt + its longer response): checked against the model's positions
        self.longest = int((self.index[:, 1] + self.index[:, 2:].max(1, initial=0)).max()) if len(self.index) else 0
        self._digest = None
        self.extra = self._read_extra() if kind in ('prompt', 'unpaired') else None
        if kind == 'unpaired':  # KTO: each example's label (desirable or not), both kinds needed in every split
            labels = [e.get('label') for e in self.extra]
            if not all(isinstance(x, bool) for x in labels) or len(set(labels)) < 2:
                raise DataError(f"{path}_extra.jsonl: unpaired split '{name}' needs a true or false label on every "
                                f"example and both kinds ({sum(x is True for x in labels)} true of {len(labels)}): "
                                f"KTO weighs desirable against undesirable completions; add the missing kind")
            self.labels = np.array(labels, dtype=bool)
        self.margin = self._read_margin() if kind == 'pref' and os.path.exists(path + '_margin.npy') else None

    def _read_extra(self):
        """Prompt splits: each example's other fields (what the reward function reads); unpaired splits: each
        example's label. One JSON object a line."""
        path = self.path + '_extra.jsonl'
        if not os.path.exists(path):
            raise DataError(f"{path} not found: prompt split '{self.name}' was prepared by an older data/prepare.py or "
                            f"copied without it; prepare the split again")
        with open(path) as f:
            extra = [json.loads(line) for line in f if line.strip()]
        if len(extra) != len(self.index):
            raise DataError(f"{path} holds {len(extra)} records, not the {len(self.index)} of {self.path}_index.npy: "
                            f"files from different runs; prepare the split again")
        return extra

    def _read_margin(self):
        """Preference splits: each pair's margin (TRL's column, data/prepare.py), float32 [n], if the records had one."""
        margin = np.load(self.path + '_margin.npy')
        if margin.shape != (len(self.index),):
            raise DataError(f"{self.path}_margin.npy holds {margin.shape} margins, not one for each of the "
                            f"{len(self.index)} pairs of {self.path}_index.npy: files from different runs; prepare the "
                            f"split again")
        return margin

    def digest(self):
        """sha256 of the split's two files: what f* and the cached reference log-probs were measured on (by content,
        so a moved or copied dataset still matches). Computed once."""
        if self._digest is None:
            suffixes = ('.bin', '_index.npy') + (('_extra.jsonl',) if self.extra is not None else ()) + \
                (('_margin.npy',) if self.margin is not None else ())  # answers, labels and margins count too
            self._digest = [file_digest(self.path + suffix) for suffix in suffixes]
        return self._digest

    def round_robin(self, n, batch_size):
        """This rank's share of the split's first n examples, each on exactly one rank (i % world_size == rank), as
        [(ids, weights)] batches of batch_size (of up to max_tokens tokens, if set), as many on every rank (ZeRO-3's
        forwards are collective; every rank cuts every rank's share, so no rank needs to ask): a rank out of examples
        gets example 0 with weight 0."""
        shares = [np.arange(r, n, self.world_size) for r in range(self.world_size)]
        if self.max_tokens:
            cuts = [self._cut(share, 0, len(share), self.max_tokens) for share in shares]
        else:
            cuts = [list(range(0, len(share), batch_size)) + [len(share)] for share in shares]
        mine, bounds = shares[self.rank], cuts[self.rank]
        chunks = [mine[a:b] for a, b in zip(bounds, bounds[1:])]
        chunks += [mine[:0]] * (max(len(c) for c in cuts) - len(bounds))
        return [(ids, np.ones(len(ids))) if len(ids) else (np.zeros(1, np.int64), np.zeros(1)) for ids in chunks]

    def check_batch(self, n):
        if n * self.world_size > len(self.ids):
            raise DataError(f"split '{self.name}' has {len(self.ids)} examples, fewer than one batch "
                            f"({n} x {self.world_size} ranks): lower batch_size or add data")

    def next_ids(self, n, advance=True):
        """The next n examples of this rank; every rank's cursor moves by n·world_size."""
        step = n * self.world_size
        epoch, cursor = (self.epoch + 1, 0) if self.cursor + step > len(self.ids) else (self.epoch, self.cursor)
        order = self._permutation(epoch)
        if advance:
            self.epoch, self.cursor = epoch, cursor + step
        return order[cursor + self.rank * n:cursor + (self.rank + 1) * n]

    def tokens_of(self, ids):
        """The real (unpadded) tokens of the rows batch(ids) builds: an example's prompt + response, both rows of a pair,
        and for unpaired data also each prompt's row with the previous example's completion (cut as _unpaired cuts it)."""
        rows = self.index[np.asarray(ids, dtype=np.int64)]
        prompt, responses = rows[:, 1], rows[:, 2:]
        if self.kind == 'unpaired':
            own = responses[:, 0]
            return int((2 * prompt + own + np.minimum(np.roll(own, 1), np.maximum(1, self.longest - prompt))).sum())
        return int((prompt * responses.shape[1] + responses.sum(1)).sum())

    def _cut(self, order, start, stop, budget, count=None, least=1):
        """Bounds [start, b1, b2, ...] of micro-batches of order[start:stop], each filled greedily up to budget tokens
        (as many examples as fit, in order, at least `least`), until count micro-batches or too few examples are left."""
        bounds = [start]
        while (count is None or len(bounds) <= count) and stop - bounds[-1] >= least:
            end = bounds[-1] + least
            while end < stop and self.tokens_of(order[bounds[-1]:end + 1]) <= budget:
                end += 1
            bounds.append(end)
        return bounds

    def _permutation(self, epoch):
        if self._epoch != epoch:  # one permutation per epoch, the same on every rank
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.ids)
        return self._order

    def next_update(self, batch_size, steps):
        """This rank's micro-batches of the next update (steps arrays of example ids) and the number of examples the
        update holds over all ranks. Without max_tokens: batch_size examples each. With it: the update's
        steps·world_size micro-batches are cut from the epoch's permutation, each filled up to max_tokens tokens, by
        every rank alike (the same permutation and lengths: no communication), and rank r's micro-step m is the
        update's micro-batch m·world_size + r, as next_ids deals fixed batches. An update the rest of the epoch cannot
        fill starts the next epoch (the rest is skipped, as next_ids skips a remainder smaller than one batch).
        Unpaired data (KTO) takes 2 examples or more a micro-batch: its KL rows pair an example with another's completion."""
        if not self.max_tokens:
            return [self.next_ids(batch_size) for _ in range(steps)], batch_size * steps * self.world_size
        count = steps * self.world_size
        for epoch, cursor in ((self.epoch, self.cursor), (self.epoch + 1, 0)):  # (check_tokens: a fresh epoch fills one)
            order = self._permutation(epoch)
            bounds = self._cut(order, cursor, len(order), self.max_tokens, count, least=1 + (self.kind == 'unpaired'))
            if len(bounds) > count:
                break
        self.epoch, self.cursor = epoch, bounds[-1]
        chunks = [order[a:b] for a, b in zip(bounds, bounds[1:])]
        return chunks[self.rank::self.world_size], bounds[-1] - bounds[0]

    def _own_tokens(self):
        """The tokens each example costs on its own: its prompt once per response, and the responses."""
        return self.index[:, 1] * (self.index.shape[1] - 2) + self.index[:, 2:].sum(1)

    def least_budget(self):
        """The tokens of the split's largest micro-batch: its longest example (unpaired data: two, with their KL rows)."""
        own = self._own_tokens()
        least, largest = (2, own + np.maximum(self.longest, self.index[:, 1] + 1)) if self.kind == 'unpaired' else (1, own)
        return int(np.sort(largest)[-least:].sum())

    def check_tokens(self, steps):
        """max_tokens must hold the split's largest micro-batch (least_budget) and the split enough tokens for one
        update in any order (each micro-batch holds at most max_tokens)."""
        own = self._own_tokens()
        least, need = 1 + (self.kind == 'unpaired'), self.least_budget()
        if self.max_tokens < need:
            raise DataError(f"max_tokens_per_batch={self.max_tokens} is smaller than the "
                            f"{'two longest examples with their KL rows' if least == 2 else 'longest example'} of split "
                            f"'{self.name}' ({need} tokens{', both rows of a pair' * (self.kind == 'pref')}): raise "
                            f"max_tokens_per_batch to at least {need}")
        mine = np.sort(own[self.ids])  # a fresh epoch's micro-batches leave out fewer than `least` examples at its end
        if int(mine[:len(mine) - least + 1].sum()) < self.max_tokens * steps * self.world_size:
            raise DataError(f"split '{self.name}' holds {int(mine.sum())} tokens, fewer than one update of {steps} "
                            f"micro-batches x {self.world_size} ranks of max_tokens_per_batch={self.max_tokens}: lower "
                            f"max_tokens_per_batch or gradient_accumulation_steps, or add data")

    def batch(self, ids):
        """input_ids, attention_mask, response_mask [rows, L] (right-padded), the example ids and the split's name.
        Preference splits give 2·len(ids) rows: all chosen first, then all rejected (one forward per model).
        Prompt splits give the prompts left-padded (what generate continues) and each example's extra fields."""
        if self.kind == 'prompt':
            return self._prompts(ids)
        if self.kind == 'unpaired':
            return self._unpaired(ids)
        rows, masks = [], []
        for i in ids:
            offset, prompt, *responses = (int(x) for x in self.index[i])
            prompt_tokens, start = self.tokens[offset:offset + prompt], offset + prompt
            for length in responses:  # sft: one response; pref: chosen then rejected
                rows.append(np.concatenate([prompt_tokens, self.tokens[start:start + length]]))
                masks.append(np.r_[np.zeros(prompt, bool), np.ones(length, bool)])
                start += length
        if self.kind == 'pref':
            rows, masks = rows[0::2] + rows[1::2], masks[0::2] + masks[1::2]
        return self._padded(rows, masks, ids)

    def _padded(self, rows, masks, ids):
        lengths = np.array([len(r) for r in rows])
        input_ids = np.full((len(rows), lengths.max()), self.meta['pad_id'], np.int64)
        response_mask = np.zeros(input_ids.shape, bool)
        for j, (r, m) in enumerate(zip(rows, masks)):
            input_ids[j, :len(r)], response_mask[j, :len(m)] = r, m
        attention_mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        to = lambda a: torch.from_numpy(a).to(self.device)
        batch = {'input_ids': to(input_ids), 'attention_mask': to(attention_mask), 'response_mask': to(response_mask),
                 'index': torch.as_tensor(np.asarray(ids), device=self.device), 'split': self.name}
        if self.margin is not None:  # per pair, in the order of ids
            batch['margin'] = to(self.margin[np.asarray(ids, dtype=np.int64)])
        return batch

    def _unpaired(self, ids):
        """2·len(ids) rows: each prompt with its own completion, then each prompt with the previous example's
        completion (cycled within the batch, as TRL's KTO builds its KL pairs; cut to the split's longest row), and
        the labels [len(ids)] (bool)."""
        prompts, completions = [], []
        for i in ids:
            offset, prompt, length = (int(x) for x in self.index[i])
            prompts.append(self.tokens[offset:offset + prompt])
            completions.append(self.tokens[offset + prompt:offset + prompt + length])
        limit = self.longest  # a prompt with another's completion stays within what the split was prepared to
        mismatched = [c[:max(1, limit - len(p))] for p, c in zip(prompts, completions[-1:] + completions[:-1])]
        rows = [np.concatenate([p, c]) for p, c in zip(prompts + prompts, completions + mismatched)]
        masks = [np.r_[np.zeros(len(p), bool), np.ones(len(c), bool)] for p, c in zip(prompts + prompts, completions + mismatched)]
        batch = self._padded(rows, masks, ids)
        batch['labels'] = torch.as_tensor(self.labels[np.asarray(ids)].astype(bool), device=self.device)
        return batch

    def _prompts(self, ids):
        prompts = [self.tokens[int(o):int(o) + int(n)] for o, n in (self.index[i] for i in ids)]
        L = max(len(p) for p in prompts)
        input_ids = np.full((len(prompts), L), self.meta['pad_id'], np.int64)
        attention_mask = np.zeros((len(prompts), L), np.int64)
        for j, p in enumerate(prompts):
            input_ids[j, L - len(p):], attention_mask[j, L - len(p):] = p, 1
        to = lambda a: torch.from_numpy(a).to(self.device)
        return {'input_ids': to(input_ids), 'attention_mask': to(attention_mask),
                'index': torch.as_tensor(np.asarray(ids), device=self.device), 'split': self.name,
                'extra': [self.extra[int(i)] for i in ids]}

    def state_dict(self):
        return {'epoch': self.epoch, 'cursor': self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor = state['epoch'], state['cursor']


def run_splits(c, kinds, rank, world_size, device):
    """The splits a run reads, from its config c: data_dir, meta, and {objective: Split} for training (keep_list
    applied to keep_objective's split; under data_selection the trusted split rides along as 'trusted', so that its
    cursor is checkpointed too) and for held-out evals. kinds: objective -> kind of split. Raises DataError."""
    data_dir = resolve_dataset(c['dataset'])  # 'demo' is data/demo; a directory path (data/demo/, /abs/dir) works too
    meta = load_meta(data_dir)
    check_meta(meta, meta['vocab_size'], os.path.join(data_dir, 'meta.json'))  # ids < the data's vocab <= the model's
    keep = None
    if c['keep_list']:
        if not os.path.exists(c['keep_list']):
            raise DataError(f"keep_list {c['keep_list']} not found: run the data selector first (docs/data-selection.md)")
        keep = np.load(c['keep_list'])

    def split(key, name, keep=None):
        if name not in c[key]:
            raise DataError(f"no split for objective '{name}' in {key}={c[key]}: add it to {key}")
        return Split(data_dir, c[key][name], kinds[name], meta, c['seed'], rank, world_size, device, keep, c['keep_list'],
                     key=f"{key}['{name}']")

    objectives = c['objectives']
    train = {n: split('train_splits', n, keep if n == c['keep_objective'] else None) for n in objectives}
    val = {n: split('val_splits', n) for n in objectives}
    if c['data_selection']:
        selected = c['selection_objective']
        if selected not in objectives or (c['lower_level'] == 'copy' and c['deepspeed'] and c['zero_stage'] == 3):
            raise DataError(f"data_selection: selection_objective '{selected}' must be one of {objectives}, and under "
                            f"ZeRO-3 the policy cannot be copied: set lower_level='reference' (or zero_stage <= 2)")
        train['trusted'] = Split(data_dir, c['trusted_split'], kinds[selected], meta, c['seed'], rank, world_size, device,
                                 key='trusted_split')
    for s in [*train.values(), *val.values()]:  # max_tokens_per_batch: RL's prompt splits keep batch_size
        s.max_tokens = c['max_tokens_per_batch'] if s.kind != 'prompt' else 0
    for s in train.values():
        if not s.max_tokens:
            s.check_batch(c['batch_size'])
    by_tokens = [(s, steps) for group, steps in ((train, c['gradient_accumulation_steps']), (val, 0))
                 for s in group.values() if s.max_tokens]
    for s, steps in sorted(by_tokens, key=lambda x: -x[0].least_budget()):  # a too-small budget: the least that fits all
        s.check_tokens(steps)
    if (c['example_weights'] or c['coreset']) and c['keep_objective'] not in objectives:
        raise DataError(f"example_weights/coreset index keep_objective's train split, but '{c['keep_objective']}' is "
                        f"not one of objectives={objectives}: set keep_objective")
    return data_dir, meta, train, val


def check_fits(splits, positions, vocab_size, data_dir, new_tokens):
    """Every example within the model's positions (a prompt split's with new_tokens of completion) and every token id
    within its vocabulary: otherwise the first batch would crash deep inside transformers. Raises DataError."""
    for s in splits:
        longest = s.longest + (new_tokens if s.kind == 'prompt' else 0)
        if positions and longest > positions:
            raise DataError(f"{s.name} in {data_dir} has examples of up to {longest} tokens"
                            f"{' with rl_max_new_tokens' * (s.kind == 'prompt')}, more than the model's {positions} "
                            f"positions (block_size for a scratch model): prepare the data with --max_length={positions} "
                            f"or raise block_size")
    for s in splits:
        if len(s.tokens) and int(s.tokens.max()) >= vocab_size:
            raise DataError(f"{s.name}.bin in {data_dir} holds token id {int(s.tokens.max())} >= the model's vocab "
                            f"{vocab_size}: the bins were prepared with another tokenizer; prepare them again")
