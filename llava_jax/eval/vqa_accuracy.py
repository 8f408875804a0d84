r"""VQA answer normalisation and soft accuracy, as the EvalAI servers and LLaVA's scorers compute them.

`normalize_answer` is MMF's `EvalAIAnswerProcessor` (the copy in LLaVA's `llava/eval/m4c_evaluator.py`,
used by `eval_textvqa.py`, `convert_vqav2_for_submission.py` and `convert_vizwiz_for_submission.py`),
reproduced with its quirks, because they are part of what the published numbers mean:

- the period rule's lookbehind is mistyped (`(?!<=\d)`, a lookahead for the text "<=" and a digit):
  a period is removed unless a digit follows it, whatever precedes it ("2.5" stays, "5." -> "5");
- `re.sub` receives `re.UNICODE` as its positional `count`: at most 32 periods are removed;
- a punctuation mark is deleted (not replaced by a space) when it is next to a space anywhere in
  the answer; the digit,digit comma rule never fires, since every comma is removed first;
- "none" counts as the number 0; articles go; contractions are written with apostrophes, except the
  table's capitalised keys ("Im", "Ive"), which never match the lower-cased text, and
  "somebody'd", which the table turns into "somebodyd".

`soft_scores` is `TextVQAAccuracyEvaluator._compute_answer_scores`: an answer scores the mean, over
the ground-truth answers left out one at a time, of min(1, matches among the others / 3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's",
    'howd': "how'd", 'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
    'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll",
    "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's",
    'somethingd': "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    'somethingll': "something'll", 'thats': "that's", 'thered': "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", 'therere': "there're", 'theres': "there's", 'theyd': "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're",
    'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    'weve': "we've", 'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's",
    'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've",
    'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's",
    'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't",
    'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
PERIOD_STRIP_COUNT = int(re.UNICODE)  # the original passes re.UNICODE (32) as re.sub's count


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as EvalAI compares it (see the module docstring)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def soft_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """Each distinct normalised ground-truth answer -> its VQA accuracy (leave-one-out, min(1, n / 3))."""
    answers = [normalize_answer(a) for a in gt_answers]
    indexed = list(enumerate(answers))
    scores = {}
    for unique in set(answers):
        accs = []
        for left_out in indexed:
            matches = [item for item in indexed if item != left_out and item[1] == unique]
            accs.append(min(1, float(len(matches)) / 3))
        scores[unique] = sum(accs) / len(accs)
    return scores


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against its ground-truth answers (0 to 1)."""
    return soft_scores(gt_answers).get(normalize_answer(prediction), 0.0)
