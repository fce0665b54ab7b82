#!/usr/bin/env python3
"""The bundled complaint-detection dataset of `cargo xtask train`, written by us.

Short customer tweets labelled `complaint` / `no complaint` (the task of the seed's
twitter_complaints example), composed from hand-written fragments with a fixed seed:
train.jsonl (320 rows) and test.jsonl (80 rows), fields `text` and `label`.

Also writes tokenizer.json: a small SentencePiece-style tokenizer (Unigram + Metaspace, T5's
special tokens <pad>=0, </s>=1, <unk>=2, `</s>` appended) trained on the train split, so the
built-in model needs no download. Needs only the `tokenizers` package.

    python examples/data/complaints/make_dataset.py
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
random.seed(1128)

BRANDS = ["@HondaCustSvc", "@AppleSupport", "@comcast", "@AmazonHelp", "@Delta", "@UPSHelp", "@VerizonSupport",
          "@SpotifyCares", "@Uber_Support", "@XboxSupport", "@TMobileHelp", "@BofA_Help", "@NikeService",
          "@IKEAUSA", "@SouthwestAir", "@Walmart"]
COMPLAINTS = [
    "your customer service has been horrible during the recall process",
    "my package was marked delivered but never arrived",
    "I have been on hold for two hours and nobody answers",
    "the app keeps crashing every time I open it",
    "you charged me twice for the same order",
    "my flight was cancelled and no one will rebook me",
    "the internet has been down all day again",
    "still waiting on a refund from last month",
    "the replacement part you sent is broken too",
    "your agent hung up on me in the middle of the call",
    "worst experience ever, I will never buy from you again",
    "my bill went up without any notice",
    "the driver took a completely wrong route and overcharged me",
    "my account got locked and support is useless",
    "lost my luggage and nobody can tell me where it is",
    "the store refused my return even with a receipt",
    "this is the third time my order was wrong",
    "no signal at home for a week and you keep closing my ticket",
]
PRAISE = [
    "thanks for the quick help today",
    "loving the new update, great work",
    "just got my order, everything is perfect",
    "shout out to the friendly agent who fixed my issue",
    "the new store layout looks amazing",
    "smooth flight and a great crew, thank you",
    "what time does the store open on sunday",
    "is the new model available in blue",
    "can't wait for the concert tonight",
    "happy to be a customer for ten years",
    "the support chat solved it in five minutes",
    "do you ship to canada",
    "great playlist recommendations this week",
    "my delivery came a day early, nice",
    "just upgraded my plan, excited to try it",
    "how do I change my seat online",
    "the holiday sale has great deals",
    "thank you for the birthday discount",
]
OPENERS_BAD = ["", "seriously ", "ugh ", "unbelievable, ", "again? ", "hey "]
CLOSERS_BAD = ["", " fix this", " so frustrated", " #fail", " terrible", " please help"]
OPENERS_GOOD = ["", "hey ", "wow ", "hi ", "quick question: ", ""]
CLOSERS_GOOD = ["", " :)", " #happy", " thanks!", " cheers", " love it"]


def tweet(bad):
    brand = random.choice(BRANDS)
    if bad:
        body = random.choice(OPENERS_BAD) + random.choice(COMPLAINTS) + random.choice(CLOSERS_BAD)
    else:
        body = random.choice(OPENERS_GOOD) + random.choice(PRAISE) + random.choice(CLOSERS_GOOD)
    if random.random() < 0.5:
        return f"{brand} {body}".strip()
    return f"{body.strip()} {brand}"


def main():
    rows = []
    seen = set()
    while len(rows) < 400:
        bad = random.random() < 0.45
        t = tweet(bad)
        if t in seen:
            continue
        seen.add(t)
        rows.append({"text": t, "label": "complaint" if bad else "no complaint"})
    train, test = rows[:320], rows[320:]
    for name, part in (("train", train), ("test", test)):
        with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=512, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    corpus = [f"Tweet text: {r['text']} Label: {r['label']}" for r in train]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(os.path.join(HERE, "tokenizer.json"))
    n_bad = sum(r["label"] == "complaint" for r in test)
    print(f"train {len(train)}, test {len(test)} ({n_bad} complaints), vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
