"""Offline generator of MetaMathQA-format records (GSM8K-style word problems).

Every problem family is a small template: numbers are drawn, the answer and each step are computed with exact
fractions, and the response spells every step as ``a op b = c`` so tests can re-check the arithmetic. The four
MetaMathQA augmentation types are mirrored in ``type``:

- ``GSM_AnsAug``: the question with a step-by-step answer;
- ``GSM_Rephrased``: the same problem worded differently;
- ``GSM_SV`` (self-verification): one quantity replaced by ``x``, the answer stated, solve for ``x``;
- ``GSM_FOBAR`` (forward-backward): the question with ``x``, "if we know the answer ... is N", solve for ``x``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe"]
ITEMS = [("apple", "apples"), ("notebook", "notebooks"), ("pencil", "pencils"), ("muffin", "muffins"),
         ("ticket", "tickets"), ("sticker", "stickers"), ("candle", "candles"), ("plant", "plants"),
         ("book", "books"), ("toy car", "toy cars"), ("cookie", "cookies"), ("shirt", "shirts")]
VEHICLES = ["car", "bus", "train", "bike", "boat"]
TYPES = ("GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR")


def fmt(v) -> str:
    """Format a Fraction/int the way the responses do: integers plain, else a short decimal."""
    v = Fraction(v)
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.2f}".rstrip("0").rstrip(".")


@dataclass
class Problem:
    family: str
    values: dict            # name -> number
    context: str            # template with {name} fields
    ask: str                # the question sentence
    ask_rephrased: str      # a rephrasing of context + ask (template)
    state: str              # "… is {answer}." statement for SV
    steps: list = field(default_factory=list)  # (template, value) pairs; templates may use {name} fields
    answer_fn: object = None                    # values -> Fraction
    maskable: tuple = ()                        # names that may become x

    def answer(self, values=None) -> Fraction:
        return Fraction(self.answer_fn(values or self.values))

    def render(self, text: str, masked: str | None = None, extra: dict | None = None) -> str:
        vals = {k: ("x" if k == masked else fmt(v) if isinstance(v, (int, Fraction)) else v)
                for k, v in self.values.items()}
        return text.format(**vals, **(extra or {}))


def _p(rng, lo, hi, step=1):
    return rng.randrange(lo, hi + 1, step)


def shopping(rng):
    n, (i1, i1s), (i2, i2s) = rng.choice(NAMES), *rng.sample(ITEMS, 2)
    v = dict(name=n, a=_p(rng, 2, 9), p=_p(rng, 2, 15), b=_p(rng, 2, 9), q=_p(rng, 2, 12), i1s=i1s, i2s=i2s)
    return Problem("shopping", v,
                   "{name} buys {a} {i1s} that cost ${p} each and {b} {i2s} that cost ${q} each.",
                   "How much does {name} spend in total?",
                   "Each of the {a} {i1s} {name} picks up is ${p}, and each of the {b} {i2s} is ${q}. What is the total bill?",
                   "{name} spends ${answer} in total.",
                   [("The {i1s} cost {a} * {p} = {r0} dollars.", lambda v: v["a"] * v["p"]),
                    ("The {i2s} cost {b} * {q} = {r1} dollars.", lambda v: v["b"] * v["q"]),
                    ("In total {name} spends {r0} + {r1} = {r2} dollars.", lambda v: v["a"] * v["p"] + v["b"] * v["q"])],
                   lambda v: v["a"] * v["p"] + v["b"] * v["q"], ("a", "p", "b", "q"))


def rates(rng):
    n, veh = rng.choice(NAMES), rng.choice(VEHICLES)
    v = dict(name=n, veh=veh, s=_p(rng, 10, 70, 5), h=_p(rng, 2, 6), s2=_p(rng, 10, 70, 5), h2=_p(rng, 1, 4))
    return Problem("rates", v,
                   "{name} travels by {veh} at {s} miles per hour for {h} hours, then at {s2} miles per hour for {h2} hours.",
                   "How many miles does {name} travel?",
                   "Going {s} mph for {h} hours and afterwards {s2} mph for {h2} hours, what distance does {name} cover by {veh}?",
                   "{name} travels {answer} miles.",
                   [("First {name} covers {s} * {h} = {r0} miles.", lambda v: v["s"] * v["h"]),
                    ("Then {name} covers {s2} * {h2} = {r1} miles.", lambda v: v["s2"] * v["h2"]),
                    ("Altogether that is {r0} + {r1} = {r2} miles.", lambda v: v["s"] * v["h"] + v["s2"] * v["h2"])],
                   lambda v: v["s"] * v["h"] + v["s2"] * v["h2"], ("s", "h", "s2", "h2"))


def ages(rng):
    a, b = rng.sample(NAMES, 2)
    v = dict(n1=a, n2=b, y=_p(rng, 4, 30), d=_p(rng, 2, 25), t=_p(rng, 2, 15))
    return Problem("ages", v,
                   "{n2} is {y} years old. {n1} is {d} years older than {n2}.",
                   "What will be the sum of their ages in {t} years?",
                   "{n1} is {d} years older than {n2}, who is {y} now. In {t} years, what will their ages add up to?",
                   "In {t} years the sum of their ages will be {answer}.",
                   [("{n1} is {y} + {d} = {r0} years old.", lambda v: v["y"] + v["d"]),
                    ("In {t} years {n2} will be {y} + {t} = {r1}.", lambda v: v["y"] + v["t"]),
                    ("In {t} years {n1} will be {r0} + {t} = {r2}.", lambda v: v["y"] + v["d"] + v["t"]),
                    ("The sum will be {r1} + {r2} = {r3}.", lambda v: 2 * v["y"] + v["d"] + 2 * v["t"])],
                   lambda v: 2 * v["y"] + v["d"] + 2 * v["t"], ("y", "d"))


def fractions(rng):
    n, (_, items) = rng.choice(NAMES), rng.choice(ITEMS)
    k = rng.choice([2, 3, 4, 5])
    v = dict(name=n, items=items, k=k, m=_p(rng, 2, 12) * k, g=_p(rng, 1, 9))
    return Problem("fractions", v,
                   "{name} has {m} {items}. {name} gives 1/{k} of them to a friend and then buys {g} more.",
                   "How many {items} does {name} have now?",
                   "Starting with {m} {items}, {name} hands away one {k}th of them and later gets {g} more. How many are there now?",
                   "{name} has {answer} {items} now.",
                   [("{name} gives away {m} / {k} = {r0} {items}.", lambda v: Fraction(v["m"], v["k"])),
                    ("That leaves {m} - {r0} = {r1} {items}.", lambda v: v["m"] - Fraction(v["m"], v["k"])),
                    ("After buying more, {name} has {r1} + {g} = {r2} {items}.", lambda v: v["m"] - Fraction(v["m"], v["k"]) + v["g"])],
                   lambda v: v["m"] - Fraction(v["m"], v["k"]) + v["g"], ("g",))


def percentages(rng):
    n, (item, _) = rng.choice(NAMES), rng.choice(ITEMS)
    v = dict(name=n, item=item, c=_p(rng, 20, 400, 20), d=rng.choice([10, 20, 25, 50]), t=_p(rng, 1, 9))
    return Problem("percentages", v,
                   "A {item} costs ${c}. It is on sale for {d}% off, and {name} also pays a ${t} delivery fee.",
                   "How much does {name} pay?",
                   "{name} orders a ${c} {item} with a {d} percent discount plus ${t} for delivery. What is the total cost?",
                   "{name} pays ${answer}.",
                   [("The discount is {c} * {d} / 100 = {r0} dollars.", lambda v: Fraction(v["c"] * v["d"], 100)),
                    ("The sale price is {c} - {r0} = {r1} dollars.", lambda v: v["c"] - Fraction(v["c"] * v["d"], 100)),
                    ("With delivery {name} pays {r1} + {t} = {r2} dollars.", lambda v: v["c"] - Fraction(v["c"] * v["d"], 100) + v["t"])],
                   lambda v: v["c"] - Fraction(v["c"] * v["d"], 100) + v["t"], ("t",))


def totals(rng):
    n = rng.choice(NAMES)
    g = rng.choice([2, 3, 4, 6])
    b, c = _p(rng, 2, 8), _p(rng, 3, 12) * g
    e = _p(rng, 1, 5) * g
    v = dict(name=n, b=b, c=c, e=e, g=g)
    return Problem("totals", v,
                   "{name} bakes {b} batches of {c} cookies. {name} eats {e} of them and packs the rest in bags of {g}.",
                   "How many bags does {name} fill?",
                   "There are {b} batches with {c} cookies each; {e} get eaten and the rest go into bags holding {g} cookies. How many bags are filled?",
                   "{name} fills {answer} bags.",
                   [("{name} bakes {b} * {c} = {r0} cookies.", lambda v: v["b"] * v["c"]),
                    ("After eating some, {r0} - {e} = {r1} cookies are left.", lambda v: v["b"] * v["c"] - v["e"]),
                    ("That fills {r1} / {g} = {r2} bags.", lambda v: Fraction(v["b"] * v["c"] - v["e"], v["g"]))],
                   lambda v: Fraction(v["b"] * v["c"] - v["e"], v["g"]), ())


def savings(rng):
    n = rng.choice(NAMES)
    v = dict(name=n, s=_p(rng, 5, 50, 5), w=_p(rng, 3, 20), sp=_p(rng, 5, 60))
    return Problem("savings", v,
                   "{name} saves ${s} every week for {w} weeks and then spends ${sp} on a gift.",
                   "How much money does {name} have left?",
                   "Putting away ${s} a week for {w} weeks, {name} later buys a gift for ${sp}. How much is left?",
                   "{name} has ${answer} left.",
                   [("{name} saves {s} * {w} = {r0} dollars.", lambda v: v["s"] * v["w"]),
                    ("After the gift {name} has {r0} - {sp} = {r1} dollars.", lambda v: v["s"] * v["w"] - v["sp"])],
                   lambda v: v["s"] * v["w"] - v["sp"], ("s", "w"))


def area(rng):
    n = rng.choice(NAMES)
    v = dict(name=n, l=_p(rng, 3, 30), w=_p(rng, 2, 20), c=_p(rng, 2, 9))
    return Problem("area", v,
                   "{name}'s garden is a rectangle {l} feet long and {w} feet wide. Fencing costs ${c} per foot.",
                   "How much does it cost to fence the whole garden?",
                   "A {l} ft by {w} ft rectangular garden belongs to {name}. At ${c} a foot, what does fencing all around it cost?",
                   "Fencing the garden costs ${answer}.",
                   [("The perimeter is 2 * {l} + 2 * {w} = {r0} feet.", lambda v: 2 * v["l"] + 2 * v["w"]),
                    ("The fence costs {r0} * {c} = {r1} dollars.", lambda v: (2 * v["l"] + 2 * v["w"]) * v["c"])],
                   lambda v: (2 * v["l"] + 2 * v["w"]) * v["c"], ("c",))


def sharing(rng):
    n, (_, items) = rng.choice(NAMES), rng.choice(ITEMS)
    k, per = _p(rng, 2, 8), _p(rng, 2, 12)
    v = dict(name=n, items=items, k=k, per=per, r=_p(rng, 1, 9))
    v["m"] = k * per + v["r"]
    return Problem("sharing", v,
                   "{name} has {m} {items} and keeps {r} of them. The rest are shared equally among {k} friends.",
                   "How many {items} does each friend get?",
                   "Out of {m} {items}, {name} holds on to {r} and splits the others evenly between {k} friends. How many does each friend receive?",
                   "Each friend gets {answer} {items}.",
                   [("{name} shares {m} - {r} = {r0} {items}.", lambda v: v["m"] - v["r"]),
                    ("Each friend gets {r0} / {k} = {r1} {items}.", lambda v: Fraction(v["m"] - v["r"], v["k"]))],
                   lambda v: Fraction(v["m"] - v["r"], v["k"]), ())


def time_units(rng):
    n = rng.choice(NAMES)
    v = dict(name=n, d=_p(rng, 2, 7), m=_p(rng, 15, 90, 15), h=_p(rng, 1, 5))
    return Problem("time", v,
                   "{name} practises piano for {m} minutes a day on {d} days and plays a {h} hour concert on the weekend.",
                   "How many minutes does {name} play the piano this week?",
                   "Over {d} days {name} practises {m} minutes per day, then performs for {h} hours. How many minutes of piano is that in the week?",
                   "{name} plays for {answer} minutes this week.",
                   [("Practice takes {m} * {d} = {r0} minutes.", lambda v: v["m"] * v["d"]),
                    ("The concert is {h} * 60 = {r1} minutes.", lambda v: v["h"] * 60),
                    ("In total that is {r0} + {r1} = {r2} minutes.", lambda v: v["m"] * v["d"] + v["h"] * 60)],
                   lambda v: v["m"] * v["d"] + v["h"] * 60, ("m", "d", "h"))


FAMILIES = [shopping, rates, ages, fractions, percentages, totals, savings, area, sharing, time_units]
PROMPT_ORIG = "{context} {ask}"


def _affine(problem: Problem, name: str):
    """(a, b) with answer = a * values[name] + b, or None if not affine with integer a > 0 and integer b."""
    def at(x):
        return problem.answer({**problem.values, name: x})
    x0 = problem.values[name]
    a, b = at(x0 + 1) - at(x0), at(x0) - (at(x0 + 1) - at(x0)) * x0
    if at(x0 + 7) != a * (x0 + 7) + b or a <= 0 or a.denominator != 1 or b.denominator != 1:
        return None
    return a, b


def _response(problem: Problem) -> str:
    results = {f"r{i}": fmt(fn(problem.values)) for i, (_, fn) in enumerate(problem.steps)}
    lines = [problem.render(tpl, extra=results) for tpl, _ in problem.steps]
    return "\n".join(lines + [f"The answer is: {fmt(problem.answer())}"])


def _solve_for_x(problem: Problem, name: str, a, b) -> str:
    ans, x = problem.answer(), problem.values[name]
    b_txt = f"+ {fmt(b)}" if b >= 0 else f"- {fmt(-b)}"
    lines = [f"Let x be the unknown quantity. Following the steps of the problem, the result is {fmt(a)} * x {b_txt}.",
             f"We know the result is {fmt(ans)}, so {fmt(a)} * x {b_txt} = {fmt(ans)}."]
    rhs = ans - b
    if b != 0:
        op = "-" if b > 0 else "+"
        lines.append(f"Then {fmt(a)} * x = {fmt(ans)} {op} {fmt(abs(b))} = {fmt(rhs)}.")
    if a != 1:
        lines.append(f"Dividing both sides by {fmt(a)}: x = {fmt(rhs)} / {fmt(a)} = {fmt(x)}.")
    lines += [f"The value of x is {fmt(x)}.", f"The answer is: {fmt(x)}"]
    return "\n".join(lines)


def generate_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` MetaMathQA-format records, deterministic for ``seed``; answers are exact."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        prob = rng.choice(FAMILIES)(rng)
        if prob.answer() < 0:
            continue
        original = prob.render(PROMPT_ORIG.format(context=prob.context, ask=prob.ask))
        kind = rng.choice(TYPES)
        masks = [(m, ab) for m in prob.maskable if (ab := _affine(prob, m))]
        if kind in ("GSM_SV", "GSM_FOBAR") and not masks:
            kind = "GSM_AnsAug"
        if kind == "GSM_AnsAug":
            query, response = original, _response(prob)
        elif kind == "GSM_Rephrased":
            query, response = prob.render(prob.ask_rephrased), _response(prob)
        else:
            name, (a, b) = rng.choice(masks)
            context = prob.render(prob.context, masked=name)
            if kind == "GSM_SV":
                state = prob.render(prob.state.replace("{answer}", fmt(prob.answer())), masked=name)
                query = f"{context} {state} What is the value of unknown variable x?"
            else:
                ask = prob.render(prob.ask, masked=name)
                query = (f"{context} {ask}\nIf we know the answer to the above question is {fmt(prob.answer())}, "
                         "what is the value of unknown variable x?")
            response = _solve_for_x(prob, name, a, b)
        records.append(dict(query=query, response=response, type=kind, original_question=original,
                            family=prob.family))
    return records
