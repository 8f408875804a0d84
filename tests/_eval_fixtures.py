"""Benchmark files built by hand in each benchmark's real format, with answers a real model writes.

Each builder writes into a folder and returns the paths; the answer texts mix what LLaVA writes
(bare words, letters, sentences) with the cases the original parsers trip on (case, punctuation,
newlines, empty answers, missing answers).
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import PIL.Image


def write_jsonl(path: str, records) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_json(path: str, value) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f)
    return path


def answer(qid, prompt: str, text: str, **extra) -> dict:
    """An answer line as model_vqa_loader writes it."""
    return {"question_id": qid, "prompt": prompt, "text": text, **extra, "answer_id": f"a{qid}",
            "model_id": "llava-v1.5-7b", "metadata": {}}


# --- POPE -----------------------------------------------------------------------------------------

POPE_TEXTS = [
    "Yes", "No", "no.", "NO", "Yes, there is a dog in the image.", "There is no cat in the image.",
    "I do not see a bus.", "", "No, there isn't.", "yes", "The image does not show a car. It shows a road.",
    "not sure", "Nope", "No\nthere is none", "Yes.", "no, it's a cat", "There is a bench, not a chair.",
]
POPE_OBJECTS = ["dog", "cat", "bus", "car", "bench", "chair", "person", "bottle", "cup"]


def pope(root: str) -> dict:
    """coco/coco_pope_<category>.json, llava_pope_test.jsonl, and answers (one category per block)."""
    os.makedirs(os.path.join(root, "coco"), exist_ok=True)
    questions, answers = [], []
    qid = 0
    for c, category in enumerate(["adversarial", "popular", "random"]):
        labels = []
        for k in range(9):
            obj = POPE_OBJECTS[(k + c) % len(POPE_OBJECTS)]
            label = "yes" if (k * 7 + c) % 3 != 0 else "no"
            text = f"Is there a {obj} in the image?"
            image = f"COCO_val2014_{k + 100 * c:012d}.jpg"
            labels.append({"question_id": k + 1, "image": image, "text": text, "label": label})
            qid += 1
            prompt = text + "\nAnswer the question using a single word or phrase."
            questions.append({"question_id": qid, "image": image, "text": prompt, "category": category})
            answers.append(answer(qid, prompt, POPE_TEXTS[(qid * 5) % len(POPE_TEXTS)]))
        write_jsonl(os.path.join(root, "coco", f"coco_pope_{category}.json"), labels)
    return {"annotation_dir": os.path.join(root, "coco"),
            "question_file": write_jsonl(os.path.join(root, "llava_pope_test.jsonl"), questions),
            "questions": questions, "answers": answers}


# --- ScienceQA ------------------------------------------------------------------------------------


def scienceqa(root: str) -> dict:
    """problems.json and pid_splits.json (ScienceQA's own files)."""
    os.makedirs(root, exist_ok=True)
    problems, test, val = {}, [], []
    subjects = [
        ("Which of these states is farthest north?", ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], 0,
         "", "image.png"),
        ("Which tense does the sentence use?\nMona will print her name with care.",
         ["present tense", "future tense", "past tense"], 1, "", None),
        ("Identify the question that Tom's experiment can best answer.", ["Do ping pong balls roll farther?",
         "Do ping pong balls travel farther when launched from a 30° angle?"], 1,
         "The passage below describes an experiment.  Read it  carefully.", "image.png"),
        ("What is the name of the colony shown?", ["Maryland", "New Hampshire", "Rhode Island", "Vermont"], 2,
         "", "image.png"),
        ("Which word would you find on a dictionary page?", ["gasp", "horse"], 0,
         "Guide words: garden - hawk", None),
        ("Which animal's feet are also adapted for walking on snow?", ["polar bear", "camel", "goat", "lion", "eel"], 0,
         "Lynxes live in cold places.", "image.png"),
        ("Is a hammer a good or a service?", ["a good", "a service"], 0, "", None),
        ("Which solution has a higher concentration of pink particles?", ["Solution A", "Solution B", "neither"], 2,
         "The diagram below is a model of two solutions.", "image.png"),
        ("What does the verbal irony in this text suggest?", ["The teacher was impatient.", "The teacher was calm."],
         1, "", None),
    ]
    for i, (question, choices, ans, hint, image) in enumerate(subjects):
        pid = str(100 + i)
        problems[pid] = {"question": question, "choices": choices, "answer": ans, "hint": hint, "image": image,
                         "task": "closed choice", "grade": "grade5", "subject": "natural science",
                         "topic": "geography", "category": "Geography", "skill": "skill", "caption": "A map.",
                         "lecture": "Maps have four cardinal directions.\nNorth is up.", "solution": "Look at the map.",
                         "split": "test" if i < 8 else "val"}
        (test if i < 8 else val).append(pid)
    write_json(os.path.join(root, "problems.json"), problems)
    write_json(os.path.join(root, "pid_splits.json"), {"test": test, "val": val, "train": []})
    return {"base_dir": root, "problems": problems, "test": test}


SCIENCEQA_TEXTS = ["A", "B. future tense", "The answer is C.", "b", "A.", "The answer is B. Or the answer is A.",
                   "E", None, "The answer is A"]  # None: no answer line (the question was never answered)


# --- TextVQA --------------------------------------------------------------------------------------

TEXTVQA_ITEMS = [
    ("cam1", "what is the brand of this camera?", ["dakota"] * 7 + ["dakota digital", "Dakota", "camera"],
     "Dakota."),
    ("sign2", "what does the sign say?", ["stop", "stop", "STOP", "stop sign", "stop", "unanswerable", "stop",
                                          "stop", "halt", "stop"], "STOP"),
    ("bottle3", "what brand of drink is this?", ["coca-cola", "coca cola", "coke", "coca cola", "coca-cola",
                                                 "coca cola", "cocacola", "coca cola", "coke", "coca-cola"], "Coca Cola"),
    ("clock4", "how many hands does the clock have?", ["2", "two", "2", "2", "3", "two", "2", "2", "2", "two"], "two"),
    ("price5", "what is the price?", ["10,000", "$10,000", "10000", "10,000", "10.000", "10,000", "10 000",
                                      "10,000", "$10000", "10,000"], "10,000"),
    ("book6", "who wrote this book?", ["the author", "j.k. rowling", "rowling", "j. k. rowling", "jk rowling",
                                       "j.k. rowling", "rowling", "j.k rowling", "j.k. rowling", "rowling"], ""),
]


def textvqa(root: str) -> dict:
    """TextVQA_0.5.1_val.json and answers in the four prompt layouts the original reads."""
    data, answers = [], []
    layouts = [
        lambda q: f"{q}\nReference OCR token: Dakota, Digital\nAnswer the question using a single word or phrase.",
        lambda q: f"Reference OCR token: STOP\n{q}\nAnswer the question using a single word or phrase.",
        lambda q: f"{q}\nAnswer the question using a single word or phrase.",
        lambda q: f"OCR tokens: coca cola Question: {q[0].upper() + q[1:]} Short answer:",
    ]
    for i, (image_id, question, gts, text) in enumerate(TEXTVQA_ITEMS):
        data.append({"image_id": image_id, "question": question[0].upper() + question[1:], "question_id": 34602 + i,
                     "answers": gts, "image_classes": ["Camera"], "set_name": "val"})
        answers.append(answer(image_id, layouts[i % 4](question), text))
    path = write_json(os.path.join(root, "TextVQA_0.5.1_val.json"), {"dataset_type": "val", "data": data})
    return {"annotation_file": path, "answers": answers}


# --- MME ------------------------------------------------------------------------------------------

MME_TASKS = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
             "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
MME_TEXTS = ["Yes", "No", "yes, there is one", "No.", "Not sure", "I think so", "N", "none", "Yes", "no",
             "YES", "Unknown", "There is a dog.", "nope"]


def mme(root: str) -> dict:
    """MME_Benchmark_release_version (flat and images/ + questions_answers_YN/ tasks), llava_mme.jsonl, answers.

    Three images per task, two questions per image (one Yes, one No, as MME pairs them); one ground
    truth line has MME's double space before "Please answer yes or no.".
    """
    data = os.path.join(root, "MME_Benchmark_release_version")
    questions, answers = [], []
    n = 0
    for t, task in enumerate(MME_TASKS):
        nested = task in ("artwork", "celebrity", "landmark", "posters", "scene")
        image_dir = os.path.join(data, task, "images") if nested else os.path.join(data, task)
        qa_dir = os.path.join(data, task, "questions_answers_YN") if nested else image_dir
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(qa_dir, exist_ok=True)
        for k in range(3):
            stem = f"{1000 * t + k:05d}"
            lines = []
            for j, truth in enumerate(("Yes", "No")):
                q = f"Is this a picture of item {t}-{k}-{j}?"
                space = "  " if (t, k, j) == (3, 1, 0) else " "
                lines.append(f"{q}{space}Please answer yes or no.\t{truth}")
                prompt = f"{q}\nAnswer the question using a single word or phrase."
                qid = f"{task}/{stem}.jpg"
                questions.append({"question_id": qid, "image": f"{task}/{'images/' if nested else ''}{stem}.jpg",
                                  "text": prompt, "category": task})
                answers.append(answer(qid, prompt, MME_TEXTS[(n * 3 + t) % len(MME_TEXTS)]))
                n += 1
            with open(os.path.join(qa_dir, f"{stem}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
    return {"data_dir": data, "question_file": write_jsonl(os.path.join(root, "llava_mme.jsonl"), questions),
            "answers": answers}


# --- MMBench --------------------------------------------------------------------------------------


def png_base64(seed: int, size=(20, 16)) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]


def mmbench(root: str) -> dict:
    """mmbench_dev_20230712.tsv: hints present and missing ("nan"), 2-4 options, a circular copy."""
    os.makedirs(root, exist_ok=True)
    rows = [
        [0, "What is the main color of the car?", "nan", "red", "blue", "green", "white", "B"],
        [1, "Which emotion does the person show?", "The person just heard good news.", "sad", "happy", "NA", "", "B"],
        [2, "How many people are there?", "", "1", "2", "3", "", "C"],
        [3, "Is the sky cloudy?", "Look at the top of the image.", "yes", "no", "", "", "A"],
        [1000002, "How many people are there?", "", "2", "3", "1", "", "B"],  # MMBench's circular copy of 2
    ]
    path = os.path.join(root, "mmbench_dev_20230712.tsv")
    with open(path, "w") as f:
        f.write("\t".join(MMBENCH_HEADER) + "\n")
        for r in rows:
            cells = [str(c) for c in r] + ["attribute", png_base64(r[0] % 7), "source", "l2", "nan", "dev"]
            f.write("\t".join(cells) + "\n")
    return {"annotation_file": path, "rows": rows}
