#!/usr/bin/env python3
"""Generates the quickstart dataset: data/quickstart/{train,val}.jsonl.

The task is field extraction with an exactly checkable answer: a short, messy customer message
(varied phrasing, noise, order of facts) goes in; a one-line JSON object with the customer's name,
city and order number comes out, keys in a fixed order. Exact match on the assistant turn is the
metric `qlora eval` reports, so fine-tuning success is a number.

Each line is a chat example: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}.
train.jsonl (2000) is what the quickstart recipe trains on (it holds 2% of it out for evaluation);
val.jsonl (200, never trained on) is for a recipe's `test_datasets` (shown, commented, in the
recipe; tests/e2e/test_e2e_quickstart.py evaluates on it) and for `qlora eval --data`.
Deterministic (fixed seed); standard library only. Re-run to regenerate; the files are committed.
"""
import json
import os
import random

FIRST = ["Maria", "John", "Aiko", "Pierre", "Fatima", "Lars", "Chen", "Priya", "Diego", "Olga",
         "Kwame", "Sofia", "Ahmed", "Emma", "Ivan", "Lucia", "Noah", "Yuki", "Omar", "Greta",
         "Mateo", "Hana", "Liam", "Zara", "Tomas", "Nina", "Ravi", "Elena", "Jonas", "Amara"]
LAST = ["Lopez", "Smith", "Tanaka", "Dubois", "Khan", "Berg", "Wang", "Patel", "Garcia", "Ivanova",
        "Mensah", "Rossi", "Hassan", "Brown", "Petrov", "Fernandez", "Miller", "Sato", "Aziz", "Vogel",
        "Silva", "Kim", "Walsh", "Okafor", "Novak", "Larsen", "Iyer", "Costa", "Weber", "Diallo"]
CITIES = ["Lyon", "Boston", "Osaka", "Madrid", "Nairobi", "Oslo", "Lima", "Pune", "Krakow", "Denver",
          "Porto", "Seoul", "Cairo", "Dublin", "Hamburg", "Austin", "Quito", "Turin", "Perth", "Accra"]
TEMPLATES = [
    "hi, {name} here from {city}. order #{order} still hasn't arrived?!",
    "Order {order} — wrong size again. {name}, {city}",
    "{city} customer {name} asking about order no. {order}, thanks",
    "hello!! this is {name} ({city}) - my package for order {order} is damaged :(",
    "Re: order #{order}\nFrom: {name}\nLocation: {city}\nI want a refund.",
    "can someone call me back? {name}, living in {city}, order number {order}",
    "URGENT order {order} not delivered to {city}. regards, {name}",
    "Dear support, I ({name}) placed order #{order} to {city} last week. Any update?",
    "{name} / {city} / #{order} / tracking link broken",
    "my order ({order}) arrived empty. {name} from {city}",
]
INSTRUCTION = ("Extract the customer's name, city and order number from this message. "
               "Answer with JSON only.\n\n")


def example(rng):
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city = rng.choice(CITIES)
    order = rng.randint(10000, 99999)
    text = rng.choice(TEMPLATES).format(name=name, city=city, order=order)
    if rng.random() < 0.3:
        text = text.lower() if rng.random() < 0.5 else text
    answer = json.dumps({"name": name, "city": city, "order": order}, ensure_ascii=False)
    return {"messages": [{"role": "user", "content": INSTRUCTION + text},
                         {"role": "assistant", "content": answer}]}


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "quickstart")
    os.makedirs(root, exist_ok=True)
    rng = random.Random(1234)
    for split, n in (("train", 2000), ("val", 200)):
        with open(os.path.join(root, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng), ensure_ascii=False) + "\n")
    print(f"wrote {root}/train.jsonl (2000) and val.jsonl (200)")


if __name__ == "__main__":
    main()
