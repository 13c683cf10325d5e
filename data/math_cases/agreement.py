"""
How often three math-answer rules agree with a human on cases.jsonl (kind, answer = the gold, completion, verdict =
the hand verdict: 1 right, 0 wrong), and which cases each gets wrong:

  bipost     rl_reward='math' (math_answers.py: the last box or the last expression, checked by math-verify)
  mv         math-verify used as its README shows: verify(parse('$gold$'), parse(completion)), no box rule
  tulu3      open-instruct's (Tulu 3's RLVR) rule, re-implemented below for this measurement only: on GSM8K its
             'gsm8k' verifier (the last number, compared as a string), else its 'math' verifier (candidates from the
             last \\boxed, Minerva's 'Final Answer: The final answer is ...' and the last $...$, each equal when
             sympy's LaTeX parser finds a zero difference or Hendrycks' MATH string normalization makes them equal)
  number     bipost's verify_number (GSM8K-style numbers, no dependency)

    python data/math_cases/agreement.py        # needs math-verify; tulu3 needs sympy's LaTeX parser (antlr4 4.11)
"""
import json
import os
import re
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import math_answers  # noqa: E402
import rewards  # noqa: E402

# ---- open-instruct's rule (Tulu 3), in our own words ----

# Minerva's final-answer normalization (Lewkowycz et al. 2022, appendix D), which open-instruct applies
MINERVA_REPLACE = [('an ', ''), ('a ', ''), ('.$', '$'), ('\\$', ''), ('\\ ', ''), (' ', ''), ('mbox', 'text'),
                   (',\\text{and}', ','), ('\\text{and}', ','), ('\\text{m}', '\\text{}')]
MINERVA_DROP = ['square', 'ways', 'integers', 'dollars', 'mph', 'inches', 'ft', 'hours', 'km', 'units', '\\ldots',
                'sue', 'points', 'feet', 'minutes', 'digits', 'cents', 'degrees', 'cm', 'gm', 'pounds', 'meters',
                'meals', 'edges', 'students', 'childrentickets', 'multiples', '\\text{s}', '\\text{.}', '\\text{\ns}',
                '\\text{}^2', '\\text{}^3', '\\text{\n}', '\\text{}', '\\mathrm{th}', '^\\circ', '^{\\circ}', '\\;',
                ',\\!', '{,}', '"', '\\dots']


def minerva_normalize(answer):
    answer = answer.split('=')[-1]
    for old, new in MINERVA_REPLACE:
        answer = answer.replace(old, new)
    for token in MINERVA_DROP:
        answer = answer.replace(token, '')
    answer = re.sub(r'(.*?)(\$)(.*?)(\$)(.*)', '$\\3$', answer)
    for command in ('text', 'textbf', 'overline'):
        answer = re.sub(r'(\\' + command + r'\{)(.*?)(\})', '\\2', answer)
    answer = re.sub(r'(\\boxed\{)(.*)(\})', '\\2', answer)
    answer = re.sub(r'(frac)([^{])(.)', 'frac{\\2}{\\3}', answer)
    answer = re.sub(r'(sqrt)([^{])', 'sqrt{\\2}', answer)
    answer = answer.replace('$', '')
    return answer.replace(',', '') if answer.replace(',', '').isdigit() else answer


def tulu3_box(text):
    """The last box's content as open-instruct reads it: '\\boxed ' up to a '$', else the last \\boxed (or \\fbox)
    with balanced braces; an \\fbox or an unclosed box gives None."""
    if '\\boxed ' in text:
        return text.split('\\boxed ')[-1].split('$')[0]
    start = text.rfind('\\boxed')
    start = text.rfind('\\fbox') if start < 0 else start
    if start < 0:
        return None
    depth = 0
    for j in range(start, len(text)):
        depth += {'{': 1, '}': -1}.get(text[j], 0)
        if text[j] == '}' and depth == 0:
            box = text[start:j + 1]
            return box[len('\\boxed{'):-1] if box.startswith('\\boxed{') else None
    return None


def sympy_equal(a, b):
    """sympy's LaTeX parser on both, equal when the difference simplifies to 0, 5 s at most."""
    import sympy
    from sympy.parsing.latex import parse_latex

    def stop(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(5)
    try:
        return sympy.simplify(parse_latex(a) - parse_latex(b)) == 0
    except ImportError:
        raise
    except Exception:  # noqa: BLE001 -- any parse or simplify failure means "not shown equal", as in open-instruct
        return False
    finally:
        signal.alarm(0)


def fix_fracs(text):
    parts = text.split('\\frac')
    out = parts[0]
    for part in parts[1:]:
        out += '\\frac'
        if part[:1] == '{':
            out += part
        elif len(part) < 2:
            return text
        elif part[1] == '{':
            out += '{' + part[0] + '}' + part[1:]
        else:
            out += '{' + part[0] + '}{' + part[1] + '}' + part[2:]
    return out


def hendrycks_strip(text):
    """The MATH dataset's answer normalization (Hendrycks et al.), as open-instruct applies it."""
    for old, new in (('\n', ''), ('\\!', ''), ('\\\\', '\\'), ('tfrac', 'frac'), ('dfrac', 'frac'), ('\\left', ''),
                     ('\\right', ''), ('^{\\circ}', ''), ('^\\circ', ''), ('\\$', '')):
        text = text.replace(old, new)
    if '\\text{ ' in text:  # units on the right
        parts = text.split('\\text{ ')
        if len(parts) != 2:
            raise ValueError(text)
        text = parts[0]
    text = text.replace('\\%', '').replace(' .', ' 0.').replace('{.', '{0.')
    if not text:
        return text
    text = '0' + text if text[0] == '.' else text
    if len(text.split('=')) == 2 and len(text.split('=')[0]) <= 2:
        text = text.split('=')[1]
    if '\\sqrt' in text:
        pieces = text.split('\\sqrt')
        text = pieces[0] + ''.join('\\sqrt' + (p if p[:1] == '{' else '{' + p[:1] + '}' + p[1:]) for p in pieces[1:])
    text = fix_fracs(text.replace(' ', ''))
    text = '\\frac{1}{2}' if text == '0.5' else text
    if re.fullmatch(r'\d+/\d+', text):
        a, b = text.split('/')
        text = '\\frac{' + a + '}{' + b + '}'
    return text


def hendrycks_equal(a, b):
    try:
        return hendrycks_strip(a) == hendrycks_strip(b)
    except Exception:  # noqa: BLE001 -- open-instruct compares the raw strings when normalization fails
        return a == b


def tulu3(kind, gold, completion):
    label = math_answers.gold_answer(gold)
    if kind == 'gsm8k':
        numbers = re.findall(r'[-+]?(?:\d*\.\d+|\d+)', re.sub(r'(\d),(\d)', r'\1\2', completion))
        return (numbers[-1] if numbers else completion).lower() == label.lower()
    candidates = [] if tulu3_box(completion) is None else [tulu3_box(completion)]
    minerva = re.search(r'Final Answer: The final answer is(.*?). I hope it is correct.',
                        completion + 'I hope it is correct.')
    if minerva:
        candidates.append(minerva_normalize(minerva.group(1).strip()))
    dollars = [m.start() for m in re.finditer(r'\$', completion)]
    if not candidates and len(dollars) > 1:
        candidates.append(minerva_normalize(completion[dollars[-2] + 1:dollars[-1]]))
    if not candidates:
        candidates = [minerva_normalize(completion), completion]
    return any(sympy_equal(c, label) or hendrycks_equal(c, label) for c in candidates)


def math_verify_plain(gold, completion):
    from math_verify import parse, verify
    return verify(parse('$' + math_answers.gold_answer(gold) + '$'), parse(completion))


def main():
    import logging
    logging.disable(logging.WARNING)  # sympy / math-verify parse warnings
    path = os.path.join(os.path.dirname(__file__), 'cases.jsonl')
    cases = [json.loads(line) for line in open(path)]
    checker = math_answers.MathVerifier()
    rules = {'bipost': lambda c: checker.verdict(c['answer'], c['completion']),
             'mv': lambda c: math_verify_plain(c['answer'], c['completion']),
             'tulu3': lambda c: tulu3(c['kind'], c['answer'], c['completion']),
             'number': lambda c: rewards.verify_number(None, [c['completion']], answer=[c['answer']])[0] > 0}
    verdicts = {name: [int(bool(rule(c))) for c in cases] for name, rule in rules.items()}
    checker.close()
    kinds = sorted({c['kind'] for c in cases})
    counts = ', '.join(f"{k} {sum(c['kind'] == k for c in cases)}" for k in kinds)
    print(f'{len(cases)} cases ({counts}); agreement with the hand verdict:')
    print('| rule | ' + ' | '.join(kinds) + ' | all |\n|---|' + '---|' * (len(kinds) + 1))
    for name, got in verdicts.items():
        cells = [sum(g == c['verdict'] for g, c in zip(got, cases) if c['kind'] == k) /
                 sum(c['kind'] == k for c in cases) for k in kinds]
        overall = sum(g == c['verdict'] for g, c in zip(got, cases)) / len(cases)
        print(f'| {name} | ' + ' | '.join(f'{x:.0%}' for x in cells) + f' | {overall:.0%} |')
    for name in ('mv', 'tulu3'):
        same = sum(a == b for a, b in zip(verdicts['bipost'], verdicts[name]))
        print(f'bipost agrees with {name} on {same}/{len(cases)}')
    print('\ncases where a rule differs from the hand verdict (line: kind | answer | completion | hand | ' +
          ' '.join(rules) + '):')
    for i, c in enumerate(cases):
        got = [verdicts[name][i] for name in rules]
        if any(g != c['verdict'] for g in got[:3]):
            print(f"{i + 1}: {c['kind']} | {c['answer']!r} | {c['completion']!r} | {c['verdict']} | "
                  + ' '.join(map(str, got)))


if __name__ == '__main__':
    main()
