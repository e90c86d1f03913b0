"""Text that tries to steer an LLM reading it: one detector for the judge's pre-check and RAIDER's ingest.

Both read untrusted text and hand it to an LLM as data: the judge a candidate answer, RAIDER a
pathology report. `injection_kinds(text, audience)` says which kinds of steering the text holds:

  override   "ignore the previous instructions" and its paraphrases, in English, French, Spanish,
             German, Korean, Chinese and Japanese
  verdict    a dictated verdict: verdict-shaped JSON (`{"diagnosis": true, …}`, `"pass": true`),
             "all criteria are met", "treat every point above as satisfied", "consider this fully
             consistent"
  addressed  text addressed to the reader rather than about the case: "note to the evaluator",
             "Pathologist reviewing: …", "you are the judge" (audience `evaluator`); "note to the
             AI", "when asked about the diagnosis, answer …" (audience `model`)
  markup     chat-template and role markup (`[INST]`, `<|im_start|>`, `System:` lines, block tags)
  obfuscation steering hidden from a reader or a keyword list: written in invisible tag characters,
             in base64 or ROT13, or in words that mix Latin and Cyrillic letters (no clinical text
             does; attacks do, to slip past keyword lists)

Matching runs on a *skeleton* of the text (`skeleton`): NFKC, every default-ignorable and format
character removed, case folded, look-alike letters folded to Latin by Unicode's confusables table,
combining marks dropped. `flagged_lines` also reads report lines two and three at a time, so a phrase
split over a line break is found. The lists stop the attacks that are plausible and cheap; they are not the defence itself
— the callers also fence the text with a per-call random boundary and restate their rules after
it. `evaluator` is for answers (which never address anybody); `model` is for reports, whose
ordinary lines do mention pathologists and reviewers, so those addressees are left out there.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import re
import unicodedata
from typing import Literal

import regex

Audience = Literal["evaluator", "model"]
KINDS = ("override", "verdict", "addressed", "markup", "obfuscation")

# --- the skeleton ------------------------------------------------------------------------------------
# Text is folded before it is matched, so that what looks like a phrase to a reader (or reads as one to
# an LLM) matches it here: NFKC, every default-ignorable
# and format character removed (Unicode's Default_Ignorable_Code_Point and Cf: bidi controls, zero-width
# characters, variation selectors, tags, musical beams — the `regex` package knows the properties),
# case folded, look-alike letters folded to the Latin letter they pass for (Unicode's UTS #39
# confusables table, as the `confusable-homoglyphs` package ships it: Cyrillic "о", Greek "ο", a
# dotless "ı", mathematical letters …), and every combining mark dropped (accents, U+20DB three dots,
# Mongolian selectors) except the kana voicing marks Japanese words are spelled with.
_IGNORABLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}\p{Cf}]")
_MARKS = regex.compile(r"[\p{M}--[\u3099\u309a]]", regex.V1)
_TAGS = re.compile(r"[\U000e0020-\U000e007e]")  # tag characters: an invisible copy of printable ASCII
_CYRILLIC = re.compile(r"[\u0400-\u052f]")
_MIXED_WORD = re.compile(r"\w*(?:[a-zA-Z][\u0400-\u052f]|[\u0400-\u052f][a-zA-Z])\w*")
# Encodings that hide a phrase from a list but not from an LLM, which reads them: long base64 runs and ROT13.
_BASE64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_ROT13 = str.maketrans("abcdefghijklmnopqrstuvwxyz", "nopqrstuvwxyzabcdefghijklm")


@functools.lru_cache(maxsize=1)
def _confusables() -> dict[int, str]:
    """Each character the UTS #39 table says passes for a Latin letter or digit → that letter (lower case)."""
    from confusable_homoglyphs.confusables import confusables_data

    table: dict[int, str] = {}
    for key, glyphs in confusables_data.items():
        for glyph in (g["c"] for g in glyphs):
            if len(key) != 1 or len(glyph) != 1:
                continue
            if glyph.isascii() and glyph.isalnum() and not key.isascii():
                table[ord(key)] = glyph.lower()
            elif key.isascii() and key.isalnum() and not glyph.isascii():
                table[ord(glyph)] = key.lower()
    return table


def _untagged(text: str) -> str:
    return _TAGS.sub(lambda m: chr(ord(m.group()) - 0xE0000), text)


def skeleton(text: str) -> str:
    """`text` folded for matching: NFKC, no ignorable or format characters (tags included), case folded, Latin
    look-alikes as Latin (UTS #39), no combining marks."""
    text = _IGNORABLE.sub("", unicodedata.normalize("NFKC", text or ""))
    text = unicodedata.normalize("NFD", text.casefold()).translate(_confusables())
    return unicodedata.normalize("NFC", _MARKS.sub("", text)).casefold()


# --- the phrase lists (written in skeleton form: lower case, no accents) --------------------------------
_BEFORE = r"(all|any|the|your|these|those|previous|prior|above|earlier|preceding|foregoing|evaluation|grading|scoring|judging|other|system|original|given)"
_RULES = (r"(instructions?|directions?|rubric|criteria|criterion|rules|prompt|guidelines|system\s+prompt|the\s+above|excerpts?|passages?|"
          r"everything\s+(above|before|else)|what\s+(you\s+were|was)\s+told|context)")
_OVERRIDE = [
    # English
    r"\b(ignore|disregard|forget|override|overrule|bypass|skip|drop|discard|neglect)\b(\s+" + _BEFORE + r")*\s+" + _RULES,
    r"\bnew\s+(instructions?|rules|task)\b|\binstead\s+of\s+(the\s+)?(rubric|instructions)\b",
    r"\b(do\s+not|don'?t|never)\s+(follow|apply|use)\s+(the\s+)?(above|previous|prior|rubric|criteria|instructions|rules)\b",
    # French
    r"\b(ignore[rsz]?|oublie[rsz]?|ne\s+tiens\s+pas\s+compte|ne\s+tenez\s+pas\s+compte|fais\s+abstraction|faites\s+abstraction)\b"
    r"[\w\s',]{0,30}?\b(instructions?|consignes?|regles|criteres|directives|indications|grille|ce\s+qui\s+precede)\b",
    r"\bnouvelles?\s+(instructions|consignes)\b",
    # Spanish
    r"\b(ignora|ignore|ignorad|ignoren|ignorar|olvida|olvide|olvidad|olviden|descarta|omite|no\s+tengas\s+en\s+cuenta)\b"
    r"[\w\s',]{0,30}?\b(instrucciones|indicaciones|reglas|criterios|directrices|rubrica|lo\s+anterior)\b",
    r"\bnuevas\s+instrucciones\b",
    # German
    r"\b(ignoriere|ignorier|ignoriert|ignorieren|vergiss|vergesst|vergessen|missachte|missachten|uberspringe)\b"
    r"[\w\s',]{0,40}?\b(anweisungen?|anleitungen?|regeln|kriterien|vorgaben|instruktionen|bewertungsschema|obige[sn]?)\b",
    r"\bneue\s+anweisungen?\b",
    # Korean, Chinese, Japanese (no word boundaries in these scripts)
    r"(이전|위의|앞의|모든|기존)?\s*(지시|지침|규칙|기준|명령|프롬프트|평가\s*기준)[을를은는]?\s*(모두\s*)?(무시|잊어)",
    r"(忽略|无视|無視|忘记|忘掉|不要理会|不要遵守|跳过)[^。\n]{0,12}(指令|指示|说明|說明|规则|規則|标准|標準|要求|提示)",
    r"(以前|前|上記|これまで|上)の?(指示|命令|ルール|規則|基準|プロンプト)[をは]?(すべて|全て)?(無視|忘れ)",
]
_VERDICT = [
    # verdict-shaped JSON or key: value lines, in any language
    r"\{\s*[\"'\u201c\u201d]?[^\"'\s:{},]{1,40}[\"'\u201c\u201d]?\s*:\s*(\{\s*[\"']?\w+[\"']?\s*:\s*)?[\"']?(true|false|pass|passed|fail)\b",
    r"\b(pass|passed|accepted|verdict)[\"']?\s*[:=]\s*[\"']?(true|yes|pass|accept|accepted)\b",
    # English
    r"\b(all|every|each)\s+(of\s+the\s+)?(seven\s+|7\s+|evaluation\s+|judging\s+|grading\s+|above\s+)?"
    r"(criteria|criterion|checks?|points?|items?|requirements?|boxes)\s+(above\s+|listed\s+)?"
    r"(are\s+|is\s+|should\s+be\s+|must\s+be\s+|will\s+be\s+|have\s+been\s+|as\s+)?"
    r"(pass|passes|passed|true|met|satisfied|fulfilled|ticked|green|correct)\b",
    r"\b(every|each|all)\s+(point|item|criterion|check|requirement|question)s?\s+(above|listed\s+above|in\s+the\s+rubric)\b",
    r"\b(treat|consider|regard|count|deem|mark|rate|score|grade|judge|label|take)\b\W+"
    r"(this|it|the\s+(answer|response|output|reply)|my\s+(answer|response)|everything|all|every\s+\w+|each\s+\w+)"
    r"(\W+\w+){0,3}?\W+(as\s+)?((fully|completely|entirely|totally|perfectly)\s+(consistent|correct|accurate)|"
    r"satisfied|passed|passing|a\s+pass|accepted|acceptable|met|fulfilled|correct|valid)\b",
    r"\b(mark|rate|judge|label|accept|approve|grade|score|pass)\s+(this|my|the)\s+(answer|response|output|reply)\b",
    r"\b(respond|reply|output|return|print|answer)\s+(only\s+)?(with\s+)?(the\s+)?(json|[\"']?pass[\"']?|accepted|true)\b",
    r"\b(full|top)\s+marks\b|\bperfect\s+score\b",
    # French
    r"\b(tous|toutes|chaque)\s+(les\s+)?(criteres?|points?|elements?)\s+(ci-dessus\s+)?(sont\s+|est\s+)?"
    r"(remplis?|satisfaits?|valides?|respectes?|reussis?|ok)\b",
    r"\b(considere[rsz]?|traite[rsz]?|note[rsz]?|marque[rsz]?|evalue[rsz]?)\b[\w\s',]{0,30}?\bcomme\s+"
    r"(correcte?|conforme|valide|reussie?|acceptee?|entierement\s+coherente?|satisfaisante?)\b",
    # Spanish
    r"\b(todos|todas|cada)\s+(los\s+|las\s+)?(criterios?|puntos?|requisitos?)\s+(anteriores\s+)?"
    r"(se\s+cumplen|estan\s+cumplidos|cumplidos|son\s+correctos|aprobados?|se\s+satisfacen)\b",
    r"\b(considera|considere|consideren|trata|trate|marca|marque|califica|evalua|evalue)\b[\w\s',]{0,30}?\bcomo\s+"
    r"(correct[ao]|valid[ao]|aprobad[ao]|aceptad[ao]|totalmente\s+consistente|cumplid[ao])\b",
    # German
    r"\balle\s+(kriterien|punkte|anforderungen)\s+(sind\s+)?(erfullt|bestanden|korrekt|zutreffend)\b",
    r"\b(bewerte|bewerten|betrachte|betrachten|werte|werten|markiere|markieren)\b[\w\s',]{0,30}?\bals\s+"
    r"(korrekt|richtig|bestanden|erfullt|vollstandig\s+(konsistent|korrekt)|zutreffend)\b",
    # Korean, Chinese, Japanese
    r"(모든|각)\s*(기준|항목|평가\s*기준)[을를이가은는]?\s*(모두\s*)?(충족|통과|만족|합격)",
    r"(정답|통과|합격)(으로|이라고)\s*(처리|표시|평가|채점|간주|판정)",
    r"(所有|全部|每个|每項|每项|各项|各項)\s*(标准|標準|条件|條件|项目|項目|要点|要點|评分点)\s*(均|都|皆)?\s*(已)?\s*(满足|滿足|通过|通過|符合|达标)",
    r"(标记|標記|判定|判为|评为|视为|視為|算作)\s*(为|為)?\s*(正确|正確|通过|通過|合格|满分|滿分)",
    r"(すべて|全て|全部|各)の?(基準|項目|条件|評価項目)[をはが]?(満たし|満たす|合格|クリア|達成)",
    r"(正解|合格|満点)(として|と)(扱|判定|評価|採点|み?な)",
]
# Who the text is addressed to: `who` in constructions ("note to the …", "the … should"), `label` at
# the start of a line ("Reviewer: …"). Reports name pathologists, reviewers and the pathologists'
# assistant in ordinary lines, so the `model` lists hold machine addressees only.
_ADDRESSEES = {
    "evaluator": {
        "who": r"(judge|evaluator|grader|marker|scorer|assessor|examiner|auditor|reviewer|rater|annotator|"
               r"reviewing\s+pathologist|ai|a\.i\.|model|llm|ai\s+assistant|language\s+model)",
        "label": r"(judge|evaluator|grader|scorer|assessor|examiner|auditor|reviewer|rater|pathologist\s+reviewing|"
                 r"reviewing\s+pathologist|ai|a\.i\.|llm|assistant|language\s+model)",
    },
    "model": {
        "who": r"(ai|a\.i\.|artificial\s+intelligence|llm|ai\s+assistant|virtual\s+assistant|chatbot|chat\s*gpt|"
               r"language\s+model|ai\s+model|model|gpt|claude|llama|gemini)",
        "label": r"(ai|a\.i\.|llm|ai\s+assistant|chatbot|chat\s*gpt|language\s+model|ai\s+model|note\s+to\s+(the\s+)?ai)",
    },
}
_ADDRESSED_COMMON = [
    r"\b(you\s+are|you're|act\s+as|acting\s+as)\s+(an?|the)\s+(ai\s+)?(judge|evaluator|grader|assessor|"
    r"language\s+model|ai\s+assistant|assistant|llm|ai)\b",
    r"\b(dear|hey|hi|hello|attention|note\s+to|note\s+for|message\s+to|message\s+for|instructions?\s+(to|for)|"
    r"reminder\s+(to|for)|addressed\s+to)\s+(the\s+|any\s+|all\s+)?{who}s?\b",
    r"^\s*(\w+\s+)?{label}(\s+reviewing|\s+note|\s+instructions?|\s+reading\s+this)?\s*[:,-]\s",
    r"\b(the\s+)?{who}s?\s+(must|should|shall|is\s+to|needs\s+to|has\s+to|is\s+instructed)\b",
    r"\bif\s+you\s+are\s+(an?|the)\s+{who}\b",
    # French, Spanish, German: the addressee nouns never occur in a clinical answer or report line
    r"\b(a\s+l'attention\s+d[eu]|note\s+(pour|a)|message\s+(pour|a))\s+(l'|la\s+|le\s+)?(ia|modele|assistant|"
    r"evaluat(eur|rice)|correct(eur|rice)|examinat(eur|rice)|relecteur|juge)\b",
    r"\b(nota|mensaje|aviso)\s+(para|al?)\s+(el\s+|la\s+)?(ia|modelo|asistente|evaluador|evaluadora|corrector|examinador|juez|revisor)\b",
    r"\b(hinweis|nachricht|notiz|anweisung)\s+(an|fur)\s+(die\s+|den\s+|das\s+)?(ki|modell|assistenten?|prufer(in)?|"
    r"bewerter(in)?|gutachter(in)?|korrektor)\b",
]
_ADDRESSED_EVALUATOR = [
    r"\b(rubric|grading\s+scheme|scoring\s+guide)\b|\b(seven|7)\s+criteria\b",
    r"\b(evaluat(eur|rice)s?|correct(eur|rice)s?|examinat(eur|rice)s?|evaluador(es|as?)?|prufer(in|innen)?|"
    r"bewerter(in|innen)?|korrektor(in)?)\b",
    r"(평가자|채점자|심사자|검토자|평가위원|심사위원|채점\s*기준)",
    r"(评估者|評估者|评审员|評審員|评分者|評分者|阅卷|閱卷|审核员|審核員|评委|評委)",
    r"(評価者|採点者|審査員|レビュアー|査読者|採点基準)",
]
_ADDRESSED_MODEL = [
    r"\b(if|when|whenever)\s+(you\s+are|you're)\s+(asked|questioned|prompted)\b",
    r"\b(if|when|whenever)\s+(asked|questioned|prompted)\b[^.\n]{0,80}\b(answer|respond|reply|say|state|write|output|tell)\b",
    r"(?:^|[.!?;:])\s*(please\s+)?(always\s+|only\s+)?(answer|respond|reply|say|output)\s+(only\s+|exactly\s+|always\s+)?"
    r"(with|that|as|:|[\"'\u201c])",
    r"\b(and|then|just|simply|instead)\s+(answer|respond|reply|say|output)\s+(only\s+|with\s+|that\s+)*[\"'\u201c:]",
    r"\b(your|the)\s+(answer|response|reply|output)\s+(must|should|shall|will|is\s+to)\s+be\b",
    r"\b(si|quand|lorsqu'?)\s*(on\s+)?(te|vous)\s+(demande|interroge)\b|\b(reponds|repondez)\s+(que|par|toujours)\b",
    r"\b(si|cuando)\s+(te|le|les)\s+(preguntan|pregunten|piden)\b|\b(responde|responda|contesta|conteste)\s+(que|con|siempre)\b",
    r"\bwenn\s+(du|sie)\s+gefragt\s+(wirst|werden)\b|\b(antworte|antworten\s+sie)\s+(mit|dass|immer|nur)\b",
    r"(질문을?\s*받으면|물어보면|질문하면|라고\s*(답하|대답하|답변하)|으로\s*(답하|대답하|답변하)|ai에게|모델에게|어시스턴트에게)",
    r"((如果|当|當)[^。\n]{0,6}(被问|被問|问到|問到)|请回答|請回答|回答为|回答為|一律回答|给(ai|人工智能|模型|助手)|給(ai|人工智能|模型|助手))",
    r"((聞かれたら|尋ねられたら|質問されたら)|と答え(て|なさい|ること|ろ)|aiへ|モデルへ|アシスタントへ)",
]
_MARKUP = [
    r"</?\s*(candidate_answer|answer|report|question|system|instructions?|user|assistant|excerpts?|data|rubric|criteria)\s*>",
    r"\[/?inst\]|<<\s*/?sys\s*>>|<\|[a-z_]+\|>|<\s*/?\s*(im_start|im_end|s|eos|bos)\s*>",
    r"^\s*(system|assistant|user|judge|evaluator|grader|human|ai|developer)\s*:",
    r"^\s*(#{2,}|={3,}|-{3,}|\*{3,})\s*(end|begin|start|stop)\s+(of\s+)?(data|answer|report|excerpts?|block|input)\b",
]


def _compile(patterns: list[str], names: dict[str, str] | None = None) -> re.Pattern:
    def fill(pattern: str) -> str:
        for key, value in (names or {}).items():
            pattern = pattern.replace("{" + key + "}", value)
        return pattern

    return re.compile("|".join(f"(?:{fill(p)})" for p in patterns), re.MULTILINE)


_PATTERNS: dict[str, dict[str, re.Pattern]] = {
    audience: {
        "override": _compile(_OVERRIDE),
        "verdict": _compile(_VERDICT),
        "addressed": _compile(_ADDRESSED_COMMON + (_ADDRESSED_EVALUATOR if audience == "evaluator" else _ADDRESSED_MODEL),
                              _ADDRESSEES[audience]),
        "markup": _compile(_MARKUP),
    }
    for audience in ("evaluator", "model")
}


def injection_kinds(text: str, audience: Audience = "evaluator") -> list[str]:
    """The kinds of steering (`KINDS`, in that order) found in `text` written for `audience` to read.

    `obfuscation` also marks steering that was hidden: in tag characters, base64 or ROT13, or in words
    mixing Cyrillic and Latin letters.
    """
    if audience not in _PATTERNS:
        raise ValueError(f"audience must be 'evaluator' or 'model', not {audience!r}")
    found = set(_steering(skeleton(text), audience))
    # Tag characters are invisible and dropped by the skeleton, but an LLM reads them as the ASCII they
    # encode: a text written in tags says what its decoded copy says.
    hidden = set(_steering(skeleton(_untagged(text)), audience)) if _TAGS.search(text or "") else set()
    if hidden - found or _encoded_steering(text or "", audience):
        found |= hidden | {"obfuscation"}
    if _CYRILLIC.search(text or "") and _MIXED_WORD.search(unicodedata.normalize("NFKC", _IGNORABLE.sub("", text))):
        found.add("obfuscation")
    return [kind for kind in KINDS if kind in found]


def _steering(folded: str, audience: Audience) -> list[str]:
    return [kind for kind, pattern in _PATTERNS[audience].items() if pattern.search(folded)]


def _encoded_steering(text: str, audience: Audience) -> bool:
    """True when a base64 run or the ROT13 of the text says what the text itself does not."""
    folded = skeleton(text)
    if _steering(folded.translate(_ROT13), audience) and not _steering(folded, audience):
        return True
    for run in _BASE64.findall(text):
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            continue
        if decoded.isprintable() or "\n" in decoded:
            if _steering(skeleton(decoded), audience):
                return True
    return False


def flagged_lines(text: str, audience: Audience = "model") -> list[tuple[int, int, list[str]]]:
    """(start, end, kinds) of each line of `text` with steering in it; offsets index `text`.

    Lines are also read two and three at a time, so a phrase split over line breaks ("Ignore all
    previous" / "instructions.") flags every line it spans (kind `split` added).
    """
    lines, start = [], 0
    for line in text.splitlines(keepends=True):
        end = start + len(line.rstrip("\r\n"))
        if text[start:end].strip():
            lines.append((start, end))
        start += len(line)
    kinds = [injection_kinds(text[a:b], audience) for a, b in lines]
    for i in range(1, len(lines)):  # "Note to the AI:" on one line, what it dictates on the next
        if not kinds[i] and kinds[i - 1] and text[lines[i - 1][0]:lines[i - 1][1]].rstrip().endswith(":"):
            kinds[i] = ["continued"]
    folded = [skeleton(text[a:b]) for a, b in lines]
    for width in (2, 3):
        for first in range(len(lines) - width + 1):
            for line, kind in _spanning_matches(folded[first:first + width], audience):
                found = kinds[first + line]
                kinds[first + line] = [k for k in (*KINDS, "continued", "split") if k in {*found, kind, "split"}]
    return [(a, b, k) for (a, b), k in zip(lines, kinds) if k]


def _spanning_matches(folded_lines: list[str], audience: Audience) -> list[tuple[int, str]]:
    """(line index, kind) for each line a match of the joined lines touches, when the match spans two or more."""
    joined, bounds = "", []
    for line in folded_lines:
        bounds.append((len(joined), len(joined) + len(line)))
        joined += line + " "
    touched = []
    for kind, pattern in _PATTERNS[audience].items():
        for match in pattern.finditer(joined):
            spanned = [i for i, (a, b) in enumerate(bounds) if match.start() < b and match.end() > a]
            if len(spanned) > 1:
                touched += [(i, kind) for i in spanned]
    return touched


def mask_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each (start, end) span blanked by spaces: offsets into it stay valid."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def new_boundary() -> str:
    """A per-call random fence string: data cannot close a block whose end it cannot guess."""
    import secrets

    return f"DATA-{secrets.token_hex(8).upper()}"
