"""
rl_reward = 'ifeval': IFEval's verifiable instructions (Zhou et al. 2023), checked as IFEval's strict evaluation
checks them: a completion scores 1 when it is not blank and follows every instruction of its record, else 0
(prompt-level strict accuracy; open-instruct's newer verifier gives the fraction followed instead).

A prompt record carries the instructions in one of two shapes; data/prepare.py keeps both unchanged in
<split>_extra.jsonl (every field besides the prompt):
  IFEval / google's input_data.jsonl  "instruction_id_list": ["punctuation:no_comma", ...],
                                       "kwargs": [{...}, ...]  (one dict per id; None values mean "not set")
  Tulu 3 / open-instruct RLVR          "ground_truth": "[{'instruction_id': [...], 'kwargs': [...]}]" (a Python or
                                       JSON literal: a list holding one such dict, or the dict itself)

All 25 of IFEval's instruction types, with IFEval's semantics: 'less than' is <, 'at least' is >=; keywords are
regular expressions searched case-insensitively (forbidden words as whole words); words are runs of \\w characters
(IFEval's nltk RegexpTokenizer(r'\\w+')); paragraphs are separated by *** (number_paragraphs) or by a blank line
(nth_paragraph_first_word); bullets are lines starting with '* ' or '-'; a highlight is *text* or **text** on one
line; a placeholder is [anything]; a title is <<text>>; JSON is the whole answer, ``` fences allowed.
Where IFEval needs nltk's punkt data (downloaded at run time, so not offline): sentences are split here at . ! ?
followed by a space, a quote or the end, except after common abbreviations, initials and decimals, which agrees
with punkt on ordinary prose; capital words are words (hyphens and apostrophes inside) that are all upper case.
Three types need IFEval's language detector, langdetect (an optional extra: pip install langdetect, imported only
when a record uses them): language:response_language, change_case:english_capital / english_lowercase (all upper
or all lower case, str.isupper / islower, and English). As IFEval, a text langdetect finds nothing in (no letters
once URLs and e-mail addresses are dropped) counts as in the language. Unknown ids are refused with the record named.
"""
import ast
import importlib.util
import json
import re

RELATIONS = ('less than', 'at least')


def compare(count, relation, threshold):
    if relation not in RELATIONS:
        raise ValueError(f'relation {relation!r} is not one of {RELATIONS}')
    return count < threshold if relation == 'less than' else count >= threshold


def count_words(text):
    return len(re.findall(r'\w+', text))


ABBREVIATIONS = ('mr', 'mrs', 'ms', 'dr', 'prof', 'st', 'jr', 'sr', 'inc', 'ltd', 'co', 'vs', 'etc', 'e.g', 'i.e',
                 'ph.d', 'u.s', 'fig', 'approx')


def sentences(text):
    """Sentences: text up to . ! ? (or a run of them) followed by whitespace, a closing quote or the end; a dot after a
    common abbreviation or a single letter (an initial) does not end one."""
    out, start = [], 0
    for match in re.finditer(r'[.!?]+["\')\]”’]*(?=\s|$)', text):
        before = text[start:match.start()].split()
        last = before[-1].lower().rstrip('.') if before else ''
        if match.group().startswith('.') and len(match.group()) == 1 and (last in ABBREVIATIONS or len(last) == 1 and
                                                                           last.isalpha()):
            continue
        if text[start:match.end()].strip():
            out.append(text[start:match.end()].strip())
        start = match.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _paragraphs_by_stars(text):
    return re.split(r'\s?\*\*\*\s?', text)


def number_paragraphs(text, num_paragraphs):
    """Exactly num_paragraphs paragraphs separated by ***; an empty one counts against you unless at either end."""
    parts = _paragraphs_by_stars(text)
    inner_empty = any(not p.strip() for p in parts[1:-1])
    return not inner_empty and sum(1 for p in parts if p.strip()) == num_paragraphs


def nth_paragraph_first_word(text, num_paragraphs, nth_paragraph, first_word):
    """num_paragraphs paragraphs separated by blank lines, the nth starting with first_word (case and leading quotes,
    trailing punctuation ignored)."""
    parts = re.split(r'\n\n', text)
    count = sum(1 for p in parts if p.strip())
    if nth_paragraph > count or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    word = re.split(r'[.,?!\'"]', word, maxsplit=1)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def number_bullet_lists(text, num_bullets):
    stars = re.findall(r'^\s*\*[^*].*$', text, flags=re.MULTILINE)
    dashes = re.findall(r'^\s*-.*$', text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def number_highlighted_sections(text, num_highlights):
    """*text* and **text** spans on one line with something in them (**text** once: the one-star pattern finds only
    its empty '**' ends)."""
    single = [h for h in re.findall(r'\*[^\n*]*\*', text) if h.strip('*').strip()]
    double = [h for h in re.findall(r'\*\*[^\n*]*\*\*', text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(text, section_spliter, num_sections):
    splitter = section_spliter.strip()
    return len(re.split(r'\s?' + splitter + r'\s?\d+\s?', text)) - 1 >= num_sections


def postscript(text, postscript_marker):
    marker = postscript_marker.strip()
    pattern = {'P.P.S': r'\s*p\.\s?p\.\s?s.*$', 'P.S.': r'\s*p\.\s?s\..*$'}.get(marker, r'\s*' + marker.lower() + r'.*$')
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def json_format(text):
    text = text.strip()
    for fence in ('```json', '```Json', '```JSON', '```'):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix('```').strip())
    except ValueError:
        return False
    return True


def two_responses(text):
    """Two different responses separated by ******, nothing empty between them."""
    parts = text.split('******')
    if any(not p.strip() for p in parts[1:-1]):
        return False
    kept = [p for p in parts if p.strip()]
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def capital_words(text):
    return sum(1 for w in re.findall(r"[^\W_]+(?:[-'][^\W_]+)*", text) if w.isupper())


LANGUAGE_IDS = ('language:response_language', 'change_case:english_capital', 'change_case:english_lowercase')
_detector_factory = None


def detected_language(text):
    """langdetect's ISO 639-1 code for the text ('zh-cn' / 'zh-tw' for Chinese), or None when it finds nothing to go
    on. Seeded with 0 (as DetectorFactory.seed = 0 would, without changing it for other users in the process):
    langdetect samples n-grams at random, and unseeded a short text can change language from one call to the next."""
    global _detector_factory
    from langdetect import DetectorFactory, LangDetectException
    from langdetect.detector_factory import PROFILES_DIRECTORY
    if _detector_factory is None:
        _detector_factory = DetectorFactory()
        _detector_factory.load_profile(PROFILES_DIRECTORY)  # 55 languages, about 0.3 s once
        _detector_factory.set_seed(0)
    detector = _detector_factory.create()
    try:
        detector.append(text)
        return detector.detect()
    except LangDetectException:
        return None


CHECKS = {  # id -> (check(text, **kwargs) -> bool, the kwargs it needs)
    'keywords:existence': (lambda t, keywords: all(re.search(k, t, flags=re.IGNORECASE) for k in keywords),
                           ('keywords',)),
    'keywords:frequency': (lambda t, keyword, frequency, relation: compare(
        len(re.findall(keyword.strip(), t, flags=re.IGNORECASE)), relation, frequency), ('keyword', 'frequency', 'relation')),
    'keywords:forbidden_words': (lambda t, forbidden_words: not any(
        re.search(r'\b' + w + r'\b', t, flags=re.IGNORECASE) for w in forbidden_words), ('forbidden_words',)),
    'keywords:letter_frequency': (lambda t, letter, let_frequency, let_relation: compare(
        t.lower().count(letter.strip().lower()), let_relation, let_frequency), ('letter', 'let_frequency', 'let_relation')),
    'length_constraints:number_sentences': (lambda t, num_sentences, relation: compare(
        len(sentences(t)), relation, num_sentences), ('num_sentences', 'relation')),
    'length_constraints:number_paragraphs': (number_paragraphs, ('num_paragraphs',)),
    'length_constraints:number_words': (lambda t, num_words, relation: compare(count_words(t), relation, num_words),
                                        ('num_words', 'relation')),
    'length_constraints:nth_paragraph_first_word': (nth_paragraph_first_word,
                                                    ('num_paragraphs', 'nth_paragraph', 'first_word')),
    'detectable_content:number_placeholders': (lambda t, num_placeholders: len(re.findall(r'\[.*?\]', t)) >=
                                               num_placeholders, ('num_placeholders',)),
    'detectable_content:postscript': (postscript, ('postscript_marker',)),
    'detectable_format:number_bullet_lists': (number_bullet_lists, ('num_bullets',)),
    'detectable_format:constrained_response': (lambda t: any(
        option in t.strip() for option in ('My answer is yes.', 'My answer is no.', 'My answer is maybe.')), ()),
    'detectable_format:number_highlighted_sections': (number_highlighted_sections, ('num_highlights',)),
    'detectable_format:multiple_sections': (multiple_sections, ('section_spliter', 'num_sections')),
    'detectable_format:json_format': (json_format, ()),
    'detectable_format:title': (lambda t: any(m.lstrip('<').rstrip('>').strip() for m in re.findall(r'<<[^\n]+>>', t)),
                                  ()),
    'combination:two_responses': (two_responses, ()),
    'combination:repeat_prompt': (lambda t, prompt_to_repeat: t.strip().lower().startswith(
        prompt_to_repeat.strip().lower()), ('prompt_to_repeat',)),
    'startend:end_checker': (lambda t, end_phrase: t.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
                             ('end_phrase',)),
    'startend:quotation': (lambda t: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"', ()),
    'change_case:capital_word_frequency': (lambda t, capital_frequency, capital_relation: compare(
        capital_words(t), capital_relation, capital_frequency), ('capital_frequency', 'capital_relation')),
    'punctuation:no_comma': (lambda t: ',' not in t, ()),
    # detected None (nothing to detect): IFEval catches langdetect's error and counts the instruction as followed
    'language:response_language': (lambda t, language: detected_language(t) in (None, language), ('language',)),
    'change_case:english_capital': (lambda t: t.isupper() and detected_language(t) in (None, 'en'), ()),
    'change_case:english_lowercase': (lambda t: t.islower() and detected_language(t) in (None, 'en'), ()),
}


def instructions(record):
    """[(id, kwargs), ...] of a prompt record in either shape; raises ValueError (one line) on an unknown id, a
    missing argument or a record without instructions."""
    ids, kwargs = record.get('instruction_id_list'), record.get('kwargs')
    if ids is None and 'ground_truth' in record:
        truth = record['ground_truth']
        if isinstance(truth, str):
            try:
                truth = ast.literal_eval(truth)
            except (ValueError, SyntaxError):
                truth = json.loads(truth)
        truth = truth[0] if isinstance(truth, list) else truth
        truth = json.loads(truth) if isinstance(truth, str) else truth
        ids, kwargs = truth.get('instruction_id'), truth.get('kwargs')
    if not isinstance(ids, list) or not ids:
        raise ValueError('has no instructions: add "instruction_id_list" and "kwargs" (IFEval) or "ground_truth" '
                         '(Tulu 3: [{"instruction_id": [...], "kwargs": [...]}])')
    kwargs = kwargs if kwargs is not None else [{}] * len(ids)
    if len(kwargs) != len(ids):
        raise ValueError(f'has {len(ids)} instruction ids but {len(kwargs)} kwargs dicts: give one dict per id')
    out = []
    for name, args in zip(ids, kwargs):
        if name not in CHECKS:
            raise ValueError(f'instruction id {name!r} is unknown: use one of {sorted(CHECKS)}, or drop the record')
        if name in LANGUAGE_IDS and importlib.util.find_spec('langdetect') is None:
            raise ValueError(f"instruction id {name!r} needs IFEval's language detector: pip install langdetect")
        args = {k: v for k, v in (args or {}).items() if v is not None}
        missing = [k for k in CHECKS[name][1] if k not in args]
        if missing:
            raise ValueError(f'instruction {name!r} needs the kwargs {missing}')
        out.append((name, {k: args[k] for k in CHECKS[name][1]}))
    return out


def check_records(records, where):
    """Every record's instructions are known and complete; else ValueError naming the file and record."""
    for i, record in enumerate(records):
        try:
            instructions(record)
        except ValueError as e:
            raise ValueError(f"{where}: record {i + 1} {e} (rl_reward='ifeval')") from None


def follows(text, record):
    """IFEval's strict verdict: the text is not blank and every instruction holds."""
    return bool(text.strip()) and all(CHECKS[name][0](text, **args) for name, args in instructions(record))


def follows_instructions(prompts, completions, instruction_id_list=None, kwargs=None, ground_truth=None, **columns):
    """The reward: 1.0 for a completion that follows all its record's instructions, else 0.0."""
    n = len(completions)
    records = [{'instruction_id_list': (instruction_id_list or [None] * n)[i], 'kwargs': (kwargs or [None] * n)[i],
                'ground_truth': (ground_truth or [None] * n)[i]} for i in range(n)]
    records = [{k: v for k, v in r.items() if v is not None} for r in records]
    return [float(follows(c, r)) for c, r in zip(completions, records)]
