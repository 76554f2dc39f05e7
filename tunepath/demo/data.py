"""Synthetic customer-service data for the demo: a fictional online store, "Northwind Outfitters".

Writes three raw input files that exercise every pipeline path (SFT chats, continued-pretraining text,
DPO preference pairs) plus a few deliberately broken chat rows for the validate stage's quarantine.
Output depends only on the seed (a private `random.Random`), so the same seed gives the same bytes.

Usage:

    from pathlib import Path
    from tunepath.demo import DemoConfig, generate_demo_data
    counts = generate_demo_data(Path("data/raw"), DemoConfig(seed=0))
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunepath.demo import DemoConfig

log = logging.getLogger(__name__)

SIGN_OFF = "— Northwind Support"
MAX_CHAT_CHARS = 600  # keeps most chats inside the tiny model's 256-token training sequences
BAD_ROW_KINDS = ("truncated_json", "empty_assistant", "unknown_role", "ends_with_user")

# (English name, Chinese name, category): the category picks sizes and care notes.
PRODUCTS = [
    ("Trailhead Rain Jacket", "Trailhead 防雨夹克", "apparel"),
    ("Coastal Fleece Pullover", "Coastal 抓绒套头衫", "apparel"),
    ("Alpine Down Vest", "Alpine 羽绒背心", "apparel"),
    ("Canyon Trail Shorts", "Canyon 徒步短裤", "apparel"),
    ("Meadow Merino Socks", "Meadow 美利奴羊毛袜", "apparel"),
    ("Ridgeline Hiking Boots", "Ridgeline 登山靴", "footwear"),
    ("Riverbend Trail Runners", "Riverbend 越野跑鞋", "footwear"),
    ("Summit 40L Backpack", "Summit 40升背包", "gear"),
    ("Basecamp 2-Person Tent", "Basecamp 双人帐篷", "gear"),
    ("Glacier Insulated Bottle", "Glacier 保温水壶", "gear"),
]
APPAREL_SIZES = ["XS", "S", "M", "L", "XL"]
SHOE_SIZES = [str(s) for s in range(38, 47)]
PAYMENT_METHODS = [("Visa", "Visa 卡"), ("Mastercard", "万事达卡"), ("PayPal", "PayPal"), ("gift card", "礼品卡")]

SYSTEM_EN = [
    "You are the customer support assistant of Northwind Outfitters, an online store for outdoor clothing and gear. Be concise, friendly and accurate.",
    "You are Northwind Outfitters' support agent. Answer from store policy and sign off as Northwind Support.",
    "You help Northwind Outfitters customers with orders, shipping, returns, refunds, sizes, warranty, accounts and payments.",
]
SYSTEM_ZH = [
    "你是 Northwind Outfitters 网上户外用品商店的客服助手。请简洁、友好、准确地回答。",
    "你是 Northwind Outfitters 的客服代表，请根据商店政策回答顾客的问题。",
]
FOLLOW_PREFIX_EN = ["Thanks! One more thing: ", "Great, thank you. Also, ", "OK, and ", "Got it. Also, "]
FOLLOW_PREFIX_ZH = ["谢谢！还有一个问题：", "好的。", "明白了。另外，"]

# Each topic: user questions, follow-up questions, answers, off-policy/curt answers, and policy facts,
# in English and Chinese. Answers address the issue in their first sentence; the sign-off is added later.
TOPICS: dict[str, dict[str, list[str]]] = {
    "order_status": {
        "ask_en": [
            "Hi, where is my order {order}? I placed it on {date}.",
            "Can you check the status of order {order}?",
            "My order {order} for the {product} still hasn't arrived.",
        ],
        "answer_en": [
            "Your order {order} shipped on {ship_date} with tracking number {tracking} and should arrive by {eta}. You can follow it under Account > Orders.",
            "Order {order} ({product}) left our warehouse on {ship_date}; tracking number {tracking} shows it on schedule for delivery by {eta}.",
        ],
        "bad_en": ["It's shipped. Wait.", "No idea, ask the courier."],
        "ask_zh": ["你好，我的订单 {order} 到哪里了？我是{date}下的单。", "请帮我查一下订单 {order} 的状态。"],
        "answer_zh": ["您的订单 {order} 已于{ship_date}发货，运单号 {tracking}，预计{eta}前送达。您可以在“账户 > 订单”中查看物流。"],
        "bad_zh": ["已经发了，等着吧。"],
        "facts_en": [
            "Orders placed before 2 pm ship the same business day.",
            "Every shipped order gets a tracking number by email.",
            "You can follow any order under Account > Orders.",
        ],
        "facts_zh": ["下午两点前的订单当天发货。", "每个发货的订单都会通过邮件收到运单号。"],
    },
    "shipping": {
        "ask_en": [
            "How long does shipping take to {city}?",
            "Do you offer express shipping for the {product}?",
            "Is shipping free if I spend more than $50?",
        ],
        "answer_en": [
            "Standard shipping takes 3-5 business days and is free on orders over $50. Express shipping takes 1-2 business days for $12.",
            "We deliver to {city} in 3-5 business days with standard shipping, or 1-2 business days with express for $12. Orders over $50 ship free.",
        ],
        "bad_en": ["Shipping takes however long it takes.", "Whatever, it will get there."],
        "ask_zh": ["寄到{city_zh}需要多久？", "{product_zh}可以加急配送吗？"],
        "answer_zh": ["标准配送需要 3-5 个工作日，订单满 50 美元免运费；加急配送需要 1-2 个工作日，运费 12 美元。"],
        "bad_zh": ["不知道，反正会到的。"],
        "facts_en": [
            "Standard shipping takes 3-5 business days and is free on orders over $50.",
            "Express shipping takes 1-2 business days and costs $12.",
            "We do not ship on weekends or public holidays.",
        ],
        "facts_zh": ["标准配送需要 3-5 个工作日，满 50 美元免运费。", "加急配送需要 1-2 个工作日，运费 12 美元。"],
    },
    "returns": {
        "ask_en": [
            "Can I return the {product} I bought on {date}?",
            "I want to send back my {product} from order {order}. How?",
            "The {product} {isnt} what I expected. What is your return policy?",
        ],
        "answer_en": [
            "Yes, you can return the {product} within 30 days of delivery if unworn with tags attached. Start the return under Account > Orders > {order} and print the free label.",
            "Returns are free within 30 days of delivery for unworn items with tags. Open order {order} in your account, choose Return, and drop the parcel at any post office.",
        ],
        "bad_en": ["No returns.", "You bought it, you keep it."],
        "ask_zh": ["我在{date}买的{product_zh}可以退货吗？", "订单 {order} 里的{product_zh}怎么退？"],
        "answer_zh": ["可以。商品在签收后 30 天内、未穿着且吊牌完好即可免费退货。请在“账户 > 订单 > {order}”中申请退货并打印免费退货标签。"],
        "bad_zh": ["不能退。"],
        "facts_en": [
            "Unworn items with tags attached can be returned within 30 days of delivery.",
            "Return labels are free for customers in the contiguous United States.",
            "Start a return under Account > Orders and choose the item to send back.",
        ],
        "facts_zh": ["未穿着且吊牌完好的商品可在签收后 30 天内退货。", "退货标签免费。"],
    },
    "refunds": {
        "ask_en": [
            "I returned order {order} last week. When do I get my refund?",
            "Where is my refund for the {product}?",
            "How long do refunds take?",
        ],
        "answer_en": [
            "Your refund for order {order} is issued within 5-7 business days after the return reaches our warehouse, to your original payment method ({payment}). You will get an email when it is sent.",
            "Refunds go back to the original payment method within 5-7 business days after we receive the return. For order {order} that is your {payment}.",
        ],
        "bad_en": ["Refunds take months, be patient.", "We don't give refunds, only store credit."],
        "ask_zh": ["我上周退回了订单 {order}，什么时候退款？", "{product_zh}的退款去哪了？"],
        "answer_zh": ["我们收到退货后会在 5-7 个工作日内将订单 {order} 的款项退回您的原支付方式（{payment_zh}），退款后会发邮件通知您。"],
        "bad_zh": ["退款很慢，自己等。"],
        "facts_en": [
            "Refunds are issued to the original payment method within 5-7 business days after the return arrives.",
            "Original shipping fees are refunded only when the item was faulty.",
        ],
        "facts_zh": ["退货到达后 5-7 个工作日内退款至原支付方式。"],
    },
    "sizes": {
        "ask_en": [
            "I usually wear {size}. Which size of the {product} should I order?",
            "{does} the {product} run small?",
            "Can I exchange my {product} for size {size2}?",
        ],
        "answer_en": [
            "The {product} fit{s} true to size, so {size} should fit you. If it doesn't, exchanging it for size {size2} is free within 30 days.",
            "Our {product} follow{s} the size chart on its product page; most customers who wear {size} take {size}. Size exchanges are free within 30 days.",
        ],
        "bad_en": ["Just guess.", "Sizes are on the website somewhere."],
        "ask_zh": ["我平时穿 {size} 码，{product_zh}该选哪个尺码？", "{product_zh}可以换成 {size2} 码吗？"],
        "answer_zh": ["{product_zh}尺码标准，您选 {size} 码即可。如果不合适，30 天内可以免费换成 {size2} 码。"],
        "bad_zh": ["自己猜吧。"],
        "facts_en": [
            "Each product page has a size chart with body measurements in inches and centimetres.",
            "Size exchanges are free within 30 days of delivery.",
        ],
        "facts_zh": ["每个商品页面都有尺码表。", "签收后 30 天内可免费换尺码。"],
    },
    "warranty": {
        "ask_en": [
            "The zipper on my {product} broke after two months. Is that covered?",
            "What warranty do you offer on the {product}?",
            "My {product} {has} a seam coming apart. Can you fix it?",
        ],
        "answer_en": [
            "Yes, the {product} {has} a 2-year warranty that covers manufacturing defects such as broken zippers and seams. Send photos with order number {order} to warranty@northwind.example and we will repair or replace it.",
            "Manufacturing defects on the {product} are covered for 2 years from purchase. Reply with a photo of the damage and order {order}, and we will send a free repair or replacement.",
        ],
        "bad_en": ["Warranty doesn't cover anything.", "That's normal wear, buy a new one."],
        "ask_zh": ["我的{product_zh}拉链两个月就坏了，保修吗？", "{product_zh}有保修吗？"],
        "answer_zh": ["保修。{product_zh}享有 2 年保修，涵盖拉链、缝线等制造缺陷。请将照片和订单号 {order} 发送至 warranty@northwind.example，我们会为您维修或更换。"],
        "bad_zh": ["坏了就再买一个。"],
        "facts_en": [
            "All products carry a 2-year warranty against manufacturing defects.",
            "The warranty does not cover normal wear, accidents or alterations.",
            "Warranty claims need the order number and a photo of the defect.",
        ],
        "facts_zh": ["所有商品均享有 2 年制造缺陷保修。", "保修不包括正常磨损和人为损坏。"],
    },
    "account": {
        "ask_en": [
            "I forgot my password. How do I reset it?",
            "I can't log in to my account with {email}.",
            "How do I change the email address on my account?",
        ],
        "answer_en": [
            "You can reset your password with the Forgot password link on the sign-in page; we email a reset link to {email} that is valid for 30 minutes. We never ask for your password by email or chat.",
            "To get back into your account, click Forgot password on the sign-in page and follow the link we send to {email} within 30 minutes. If it expires, simply request a new one.",
        ],
        "bad_en": ["Send me your password and I'll check it.", "Make a new account."],
        "ask_zh": ["我忘记密码了，怎么重置？", "我用 {email} 登录不了账户。"],
        "answer_zh": ["请在登录页点击“忘记密码”，我们会向 {email} 发送重置链接，链接 30 分钟内有效。我们绝不会通过邮件或聊天索要您的密码。"],
        "bad_zh": ["把你的密码发给我，我帮你看看。"],
        "facts_en": [
            "Password reset links are valid for 30 minutes.",
            "Northwind staff never ask for your password.",
            "You can change your email address under Account > Settings.",
        ],
        "facts_zh": ["密码重置链接 30 分钟内有效。", "工作人员绝不会索要您的密码。"],
    },
    "payment": {
        "ask_en": [
            "Which payment methods do you accept?",
            "I was charged twice for order {order}.",
            "My {payment} was declined at checkout. Why?",
        ],
        "answer_en": [
            "We accept Visa, Mastercard, PayPal and Northwind gift cards. If you see two charges for order {order}, one is a temporary authorisation that disappears within 3-5 business days.",
            "A second charge on your {payment} for order {order} is a pending authorisation, not a payment; your bank releases it within 3-5 business days.",
        ],
        "bad_en": ["Talk to your bank.", "Paste your full card number here and I'll fix it."],
        "ask_zh": ["你们支持哪些付款方式？", "订单 {order} 被扣了两次款。"],
        "answer_zh": ["我们支持 Visa、万事达卡、PayPal 和 Northwind 礼品卡。如果订单 {order} 显示两笔扣款，其中一笔是预授权，会在 3-5 个工作日内自动撤销。"],
        "bad_zh": ["去问你的银行。"],
        "facts_en": [
            "We accept Visa, Mastercard, PayPal and Northwind gift cards.",
            "A pending authorisation disappears within 3-5 business days.",
        ],
        "facts_zh": ["我们支持 Visa、万事达卡、PayPal 和礼品卡。", "预授权会在 3-5 个工作日内撤销。"],
    },
}
# Follow-up questions for multi-turn chats, each with its own short answer (a later turn must answer what
# was asked, not repeat the topic's opening answer).
FOLLOW_UPS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "order_status": {
        "en": [
            ("can I see where the package is now?", "Yes, tracking number {tracking} shows the live status on the carrier's site."),
            ("when will order {order} arrive?", "Order {order} is due by {eta}."),
        ],
        "zh": [("包裹现在在哪里？", "用运单号 {tracking} 可以在快递公司网站查看实时位置。")],
    },
    "shipping": {
        "en": [
            ("how much is express shipping?", "Express shipping costs $12 and takes 1-2 business days."),
            ("do you ship on weekends?", "No, we ship Monday to Friday only."),
        ],
        "zh": [("加急配送多少钱？", "加急配送运费 12 美元，1-2 个工作日送达。")],
    },
    "returns": {
        "en": [
            ("do I have to pay for the return label?", "No, the return label is free."),
            ("can I return it if I already wore it outside?", "Only unworn items with tags can be returned, but defects are covered by our 2-year warranty."),
        ],
        "zh": [("退货运费要我自己付吗？", "不用，退货标签是免费的。")],
    },
    "refunds": {
        "en": [
            ("will the refund go back to my {payment}?", "Yes, refunds always go to the original payment method, your {payment}."),
            ("is the shipping fee refunded too?", "The shipping fee is refunded only if the item was faulty."),
        ],
        "zh": [("退款会退回到我的{payment_zh}吗？", "是的，退款会原路退回到您的{payment_zh}。")],
    },
    "sizes": {
        "en": [
            ("is the size exchange free?", "Yes, size exchanges are free within 30 days."),
            ("where can I find the size chart?", "The size chart is on every product page, under the size buttons."),
        ],
        "zh": [("换尺码要收费吗？", "30 天内换尺码免费。")],
    },
    "warranty": {
        "en": [
            ("do I need the receipt for the warranty?", "No receipt needed; your order number is enough."),
            ("how long does a warranty repair take?", "Warranty repairs take about 2 weeks from when we receive the item."),
        ],
        "zh": [("保修需要发票吗？", "不需要发票，提供订单号即可。")],
    },
    "account": {
        "en": [
            ("the reset link expired. What now?", "Request a new link from the sign-in page; each link works for 30 minutes."),
            ("can you just tell me my password?", "We can't see or send passwords, but the reset link lets you set a new one."),
        ],
        "zh": [("重置链接过期了怎么办？", "请在登录页重新申请链接，每个链接 30 分钟内有效。")],
    },
    "payment": {
        "en": [
            ("when will the extra charge disappear?", "The pending authorisation disappears within 3-5 business days."),
            ("can I pay with a gift card?", "Yes, Northwind gift cards are accepted at checkout."),
        ],
        "zh": [("多扣的钱什么时候退回？", "预授权会在 3-5 个工作日内自动撤销。")],
    },
}
CITIES = [("Seattle", "西雅图"), ("Denver", "丹佛"), ("Boston", "波士顿"), ("Austin", "奥斯汀"), ("Chicago", "芝加哥")]
CARE_NOTES = {
    "apparel": {
        "en": [
            "Machine wash cold on a gentle cycle and hang to dry.",
            "Do not use fabric softener; it clogs the breathable membrane.",
            "Refresh the water-repellent finish with a warm tumble dry on low.",
            "Close all zippers before washing to protect the fabric.",
        ],
        "zh": ["冷水轻柔机洗，晾干。", "请勿使用柔顺剂。", "洗涤前请拉上所有拉链。"],
    },
    "footwear": {
        "en": [
            "Brush off mud after each hike and rinse with clean water.",
            "Let the boots dry at room temperature, away from heaters.",
            "Re-wax the leather every few months to keep it waterproof.",
            "Replace the insoles when the cushioning flattens.",
        ],
        "zh": ["每次徒步后刷掉泥土并用清水冲洗。", "请在室温下自然晾干，远离暖气。"],
    },
    "gear": {
        "en": [
            "Dry the gear completely before storing it to prevent mildew.",
            "Spot clean with mild soap and a soft sponge.",
            "Store it loosely in a cool, dry place out of direct sunlight.",
            "Hand wash only; the dishwasher damages seals and coatings.",
        ],
        "zh": ["收纳前请彻底晾干，防止发霉。", "用温和肥皂和软海绵局部清洁。"],
    },
}


def _date_en(d: dt.date) -> str:
    return f"{d:%B} {d.day}"


def _date_zh(d: dt.date) -> str:
    return f"{d.month}月{d.day}日"


def _slots(rng: random.Random, topics: list[str]) -> dict[str, str]:
    """Fresh slot values for one conversation; every topic template draws from the same set."""
    # A size question about a tent or a bottle would teach nonsense.
    products = [p for p in PRODUCTS if p[2] != "gear"] if "sizes" in topics else PRODUCTS
    product, product_zh, category = rng.choice(products)
    sizes = SHOE_SIZES if category == "footwear" else APPAREL_SIZES
    size, size2 = rng.sample(sizes, 2)
    ordered = dt.date(2026, 1, 5) + dt.timedelta(days=rng.randrange(300))
    shipped = ordered + dt.timedelta(days=rng.randint(0, 2))
    eta = shipped + dt.timedelta(days=rng.randint(3, 6))
    payment, payment_zh = rng.choice(PAYMENT_METHODS)
    plural = product.endswith("s")  # "the hiking boots fit", "the rain jacket fits"
    city, city_zh = rng.choice(CITIES)
    name = rng.choice(["alex", "sam", "jordan", "li.wei", "maria", "chen", "priya", "tom"])
    return {
        "order": f"NW-{rng.randint(100000, 999999)}",
        "tracking": f"1Z{rng.randint(10**9, 10**10 - 1)}",
        "product": product,
        "product_zh": product_zh,
        "s": "" if plural else "s",
        "has": "have" if plural else "has",
        "isnt": "aren't" if plural else "isn't",
        "does": "Do" if plural else "Does",
        "size": size,
        "size2": size2,
        "date": _date_en(ordered),
        "ship_date": _date_en(shipped),
        "eta": _date_en(eta),
        "payment": payment,
        "payment_zh": payment_zh,
        "city": city,
        "city_zh": city_zh,
        "email": f"{name}{rng.randint(1, 99)}@example.com",
        "date_zh": _date_zh(ordered),
        "ship_date_zh": _date_zh(shipped),
        "eta_zh": _date_zh(eta),
    }


def _fill(template: str, slots: dict[str, str], zh: bool) -> str:
    if zh:
        slots = {**slots, "date": slots["date_zh"], "ship_date": slots["ship_date_zh"], "eta": slots["eta_zh"]}
    return template.format(**slots)


def _answer(topic: str, slots: dict[str, str], zh: bool, rng: random.Random) -> str:
    lang = "zh" if zh else "en"
    return _fill(rng.choice(TOPICS[topic][f"answer_{lang}"]), slots, zh) + "\n\n" + SIGN_OFF


def _conversation(rng: random.Random) -> dict:
    """One valid chat; decisions are drawn independently so the mix matches the target shares on average."""
    zh = rng.random() < 0.15
    with_system = rng.random() < 0.40
    exchanges = rng.choice([2, 3]) if rng.random() < 0.30 else 1
    lang = "zh" if zh else "en"
    for _attempt in range(20):
        topics = rng.sample(sorted(TOPICS), exchanges)
        slots = _slots(rng, topics)
        messages = []
        if with_system:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_ZH if zh else SYSTEM_EN)})
        for i, topic in enumerate(topics):
            if i == 0:
                question = _fill(rng.choice(TOPICS[topic][f"ask_{lang}"]), slots, zh)
                answer = _answer(topic, slots, zh, rng)
            else:
                prefix = rng.choice(FOLLOW_PREFIX_ZH if zh else FOLLOW_PREFIX_EN)
                follow_question, follow_answer = rng.choice(FOLLOW_UPS[topic][lang])
                question = prefix + _fill(follow_question, slots, zh)
                answer = _fill(follow_answer, slots, zh) + "\n\n" + SIGN_OFF
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        if sum(len(m["content"]) for m in messages) <= MAX_CHAT_CHARS:
            break
    return {"messages": messages}


def pretraining_dialogues(n: int, seed: int) -> list[str]:
    """Support dialogues as plain text ("Customer: ... Support: ..."), drawn from their own random stream: the kind
    of text a real base model has read, not the chats in chat.jsonl (so no held-out answer is seen in pretraining).
    SFT then teaches the chat template and the assistant's turn; the base already links questions to answers."""
    rng = random.Random(f"{seed}/pretraining-dialogues")
    out = []
    for _ in range(n):
        turns = [m for m in _conversation(rng)["messages"] if m["role"] != "system"]
        out.append("\n".join(("Customer: " if m["role"] == "user" else "Support: ") + m["content"] for m in turns))
    return out


def _bad_row(kind: str, rng: random.Random) -> str:
    """A broken chat line of one kind; the validate stage must quarantine each with its reason."""
    chat = _conversation(rng)
    messages = chat["messages"]
    if kind == "truncated_json":
        line = json.dumps(chat, ensure_ascii=False)
        return line[: len(line) // 2]
    if kind == "empty_assistant":
        messages[-1]["content"] = ""
    elif kind == "unknown_role":
        messages[-1]["role"] = "bot"
    elif kind == "ends_with_user":
        messages.pop()
    else:
        raise ValueError(f"unknown bad row kind {kind!r}; expected one of {BAD_ROW_KINDS}")
    return json.dumps(chat, ensure_ascii=False)


def _chat_lines(n: int, rng: random.Random) -> tuple[list[str], int]:
    lines = [json.dumps(_conversation(rng), ensure_ascii=False) for _ in range(n)]
    n_bad = max(len(BAD_ROW_KINDS), round(n * 0.015))
    positions = sorted(rng.sample(range(n + n_bad), n_bad))
    for i, pos in enumerate(positions):
        lines.insert(pos, _bad_row(BAD_ROW_KINDS[i % len(BAD_ROW_KINDS)], rng))
    return lines, n_bad


def _document(rng: random.Random) -> str:
    """A policy page, FAQ entry or product care note: a title line and a body, no blank lines."""
    zh = rng.random() < 0.15
    lang = "zh" if zh else "en"
    kind = rng.choice(["policy", "faq", "care"])
    if kind == "care":
        product, product_zh, category = rng.choice(PRODUCTS)
        notes = CARE_NOTES[category][lang]
        body = rng.sample(notes, rng.randint(2, len(notes)))
        title = f"{product_zh} 保养说明" if zh else f"Care note: {product}"
        return title + "\n" + " ".join(body) if not zh else title + "\n" + "".join(body)
    topic = rng.choice(sorted(TOPICS))
    slots = _slots(rng, [topic])
    if kind == "faq":
        question = _fill(rng.choice(TOPICS[topic][f"ask_{lang}"]), slots, zh)
        answer = _fill(rng.choice(TOPICS[topic][f"answer_{lang}"]), slots, zh)
        return f"问：{question}\n答：{answer}" if zh else f"Q: {question}\nA: {answer}"
    facts = TOPICS[topic][f"facts_{lang}"]
    body = rng.sample(facts, rng.randint(min(2, len(facts)), len(facts)))
    name = topic.replace("_", " ")
    if zh:
        return f"Northwind Outfitters 政策：{name}\n" + "".join(body)
    return f"Northwind Outfitters policy: {name}\n" + " ".join(body) + " Questions? Contact support@northwind.example."


def _preference(rng: random.Random) -> dict[str, str]:
    zh = rng.random() < 0.15
    lang = "zh" if zh else "en"
    topic = rng.choice(sorted(TOPICS))
    slots = _slots(rng, [topic])
    prompt = _fill(rng.choice(TOPICS[topic][f"ask_{lang}"]), slots, zh)
    return {
        "prompt": prompt,
        "chosen": _answer(topic, slots, zh, rng),
        "rejected": rng.choice(TOPICS[topic][f"bad_{lang}"]),
    }


def _unique(make, n: int, tries: int = 20) -> list[str]:
    """n distinct documents: the validate stage rejects exact duplicates, and the demo should not trip it."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        for _ in range(tries):
            doc = make()
            if doc not in seen:
                break
        else:
            doc = f"{doc}\nRevision {len(out) + 1}."
        seen.add(doc)
        out.append(doc)
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    # newline="\n" so the bytes do not depend on the platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def generate_demo_data(out_dir: Path, cfg: DemoConfig) -> dict[str, int]:
    """Write chat.jsonl, corpus.txt and preferences.jsonl into `out_dir`; return counts per file.

    `chat.jsonl` holds `cfg.conversations` valid chats plus `bad_rows` broken ones (truncated JSON, empty
    assistant answer, unknown role "bot", last turn by the user) at seeded positions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One generator per file so changing one count does not reshuffle the other files.
    chat_lines, n_bad = _chat_lines(cfg.conversations, random.Random(f"{cfg.seed}/chat"))
    _write_lines(out_dir / "chat.jsonl", chat_lines)

    rng = random.Random(f"{cfg.seed}/corpus")
    documents = _unique(lambda: _document(rng), cfg.documents)
    with open(out_dir / "corpus.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("\n\n".join(documents) + "\n")

    rng = random.Random(f"{cfg.seed}/preferences")
    pairs = [json.dumps(_preference(rng), ensure_ascii=False) for _ in range(cfg.preference_pairs)]
    _write_lines(out_dir / "preferences.jsonl", pairs)

    counts = {
        "chat.jsonl": len(chat_lines),
        "corpus.txt": len(documents),
        "preferences.jsonl": len(pairs),
        "bad_rows": n_bad,
    }
    log.info("demo data written to %s: %s", out_dir, counts)
    return counts
