"""
The shipped demo: tiny rule-based tasks that a 2-4 layer, 64-128 wide model learns in a few hundred
CPU steps, generated deterministically (fixed seed: running this twice gives byte-identical files).

    python data/demo/prepare.py     # writes data/demo/*.jsonl, then the bins (demo byte encoding, max_length 128)

Tasks, prompt -> answer (its terse form): "What is 7+12?\\n" -> "19", "What is 15-8?\\n" -> "7", "Reverse: kelo\\n" -> "olek",
"Uppercase: mip\\n" -> "MIP", "Next 3 letters after c\\n" -> "d e f".

The conflict: SFT teaches verbose answers ("The answer is 19."); half of the preference pairs are
*style* pairs that prefer the terse "19" over exactly that SFT answer (users who like brevity). So
DPO alone pushes probability off the SFT answer (held-out SFT loss rises) and SFT alone raises the
verbose answer far above the terse one (reward accuracy on the style pairs falls to 0). The direction
matters: the SFT answer is the long one, so SFT raises its log-prob by many tokens' worth, which the
terse chosen cannot outgrow; the trade-off stays real even with a randomly initialized reference
(preferring the *longer* style would let DPO win on length alone). The other half are *correctness*
pairs in the SFT's own style ("The answer is 19." over "The answer is 18."): there the objectives
agree, so this is a trade-off on answer style with shared content, not pure opposition.

RL (config/rl_demo.py): two-digit addition, "23+45=" -> "68", a, b in 0-49, verified by rewards.verify_number.
rl_train holds 2300 prompts with their "answer" (TRL's GRPO shape), sft_add_train demonstrations for only 500 of
them (the brief SFT warm-up before RL, and the SFT objective of the joint run): as in practice, verifiable
prompts are plentiful and demonstrations scarce. rl_val and sft_add_val hold the same 200 held-out problems,
none of them in a training split. Its own random stream: the other splits are the same with or without it.

Splits: sft_train, sft_val, pref_train, pref_val (val prompts never occur in any training split);
for the bilevel selector: sft_trusted and pref_trusted (small clean sets, prompts disjoint from train and val),
sft_noisy_train = sft_train with 25% of examples corrupted (a third each: wrong answer, garbled
characters, off-task text), pref_noisy_train = pref_train with 25% of pairs corrupted (half flipped
chosen<->rejected, half with a garbled chosen). <split>_corrupt.npy (bool [n]) marks them; it is for
measuring a selector only, never for training.
"""
import os, sys, json, random, argparse
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.prepare import prepare

N_TRAIN, N_VAL, N_TRUSTED, NOISE = 2000, 300, 150, 0.25  # ~2.3 MB on disk, shipped in git
N_ADD_VAL, N_ADD_SFT = 200, 500  # RL demo: held-out addition problems; the other 2300 of the 50 x 50 are RL prompts,
                                 # the first 500 of those also SFT demonstrations (~0.4 MB)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
OFF_TASK = ["I like turtles.", "Buy cheap watches now!", "Let's talk about the weather.", "lorem ipsum dolor",
            "Sorry, I can't help.", "Click here to win.", "The sky is blue.", "zzz"]

def word(rng):
    while True:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if w != w[::-1]:  # a palindrome would make the 'wrong' reversal correct
            return w

def task(rng):
    """One random example: (prompt, correct answer, a plausible wrong answer)."""
    kind = rng.choice(["add", "sub", "reverse", "upper", "next"])
    if kind in ("add", "sub"):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        a, b = (a, b) if kind == "add" else (max(a, b), min(a, b))
        answer = a + b if kind == "add" else a - b
        delta = rng.randint(1, 3)
        wrong = answer - delta if answer >= delta and rng.random() < 0.5 else answer + delta
        return f"What is {a}{'+' if kind == 'add' else '-'}{b}?\n", str(answer), str(wrong)
    if kind == "reverse":
        w = word(rng)
        return f"Reverse: {w}\n", w[::-1], w
    if kind == "upper":
        w = word(rng)
        return f"Uppercase: {w}\n", w.upper(), w.capitalize()
    k, start = rng.randint(1, 3), rng.randint(0, 22)
    letters = lambda s: " ".join(LETTERS[s:s + k])
    return f"Next {k} letters after {LETTERS[start]}\n", letters(start + 1), letters(start + 2)

def verbose(answer):
    return f"The answer is {answer}."

def garble(rng, text):
    chars = list(text + "".join(rng.choice(LETTERS + "0123456789#?!") for _ in range(3)))
    rng.shuffle(chars)
    return "".join(chars)

def pairs(examples):
    """Even positions: style pairs (terse over the verbose SFT answer); odd: correctness pairs in the SFT style."""
    return [dict(prompt=p, chosen=a, rejected=verbose(a)) if i % 2 == 0 else
            dict(prompt=p, chosen=verbose(a), rejected=verbose(w)) for i, (p, a, w) in enumerate(examples)]

def build(seed=1337):
    """Returns ({split: [record, ...]}, {split: bool array of corrupted examples})."""
    rng = random.Random(seed)
    pool = {}
    while len(pool) < N_TRAIN + N_VAL + N_TRUSTED:  # unique prompts, so held-out prompts are really unseen
        prompt, answer, wrong = task(rng)
        pool.setdefault(prompt, (prompt, answer, wrong))
    pool = list(pool.values())
    rng.shuffle(pool)
    val, trusted, train = pool[:N_VAL], pool[N_VAL:N_VAL + N_TRUSTED], pool[N_VAL + N_TRUSTED:]
    sft = lambda examples: [dict(prompt=p, completion=verbose(a)) for p, a, _ in examples]
    splits = dict(sft_train=sft(train), sft_val=sft(val), sft_trusted=sft(trusted),
                  pref_train=pairs(rng.sample(train, len(train))), pref_val=pairs(val), pref_trusted=pairs(trusted))
    corrupt, wrong_of = {}, {p: w for p, _, w in train}
    for name in ("sft", "pref"):
        records = [dict(r) for r in splits[f"{name}_train"]]
        chosen = sorted(rng.sample(range(len(records)), int(NOISE * len(records))))
        for j, i in enumerate(chosen):
            r = records[i]
            if name == "sft":  # a third each: wrong answer, garbled characters, off-task text
                r["completion"] = [verbose(wrong_of[r["prompt"]]), garble(rng, r["completion"]), rng.choice(OFF_TASK)][j % 3]
            elif j % 2 == 0:
                r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
            else:
                r["chosen"] = garble(rng, r["chosen"])
        splits[f"{name}_noisy_train"] = records
        corrupt[f"{name}_noisy_train"] = np.isin(np.arange(len(records)), chosen)
    splits.update(addition(seed))
    return splits, corrupt

def addition(seed):
    """The RL demo's task: every a+b= with a, b in 0-49, shuffled; the first N_ADD_VAL held out, demonstrations for
    N_ADD_SFT of the rest."""
    problems = [(f"{a}+{b}=", str(a + b)) for a in range(50) for b in range(50)]
    random.Random(seed + 1).shuffle(problems)
    val, train = problems[:N_ADD_VAL], problems[N_ADD_VAL:]
    return dict(sft_add_train=[dict(prompt=p, completion=c) for p, c in train[:N_ADD_SFT]],
                sft_add_val=[dict(prompt=p, completion=c) for p, c in val],
                rl_train=[dict(prompt=p, answer=c) for p, c in train], rl_val=[dict(prompt=p, answer=c) for p, c in val])

def main(out_dir=os.path.dirname(os.path.abspath(__file__)), seed=1337):
    splits, corrupt = build(seed)
    os.makedirs(out_dir, exist_ok=True)
    for name, records in splits.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    meta = prepare(out_dir, "demo", {name: os.path.join(out_dir, f"{name}.jsonl") for name in splits}, max_length=128)
    for name, labels in corrupt.items():
        assert meta["splits"][name]["examples"] == len(labels), "the demo must drop nothing: labels align with rows"
        np.save(os.path.join(out_dir, f"{name}_corrupt.npy"), labels)
        print(f"  {name}_corrupt.npy: {labels.sum()} of {len(labels)} corrupted")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Writes the bipost demo data set (deterministic).")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    main(parser.parse_args().out_dir)
