"""ScanNet class lists: NYU40, the ScanNet-20 benchmark and the ScanNet-200 benchmark.

==========================  ===================================================================================
name                        meaning
==========================  ===================================================================================
``NYU40_CLASSES``           the 40 NYU class names, index ``i`` is nyu40 id ``i + 1`` (0 means unlabelled)
``VALID_CLASS_IDS_20``      nyu40 ids of the 20 ScanNet benchmark classes; ``segment20`` = position in this list
``CLASS_LABELS_20``         their names (ScanNet benchmark spelling: "refridgerator", "otherfurniture", ...)
``VALID_CLASS_IDS_200``     tsv ``id`` values of the 200 ScanNet200 benchmark classes; ``segment200`` = position
``CLASS_LABELS_200``        their names (the tsv ``raw_category`` of those ids)
``clean_label``             a label as a sentence writes it ("night_stand" -> "night stand", "refridgerator" ->
                            "refrigerator"): the generated expressions and the prompts' object names
``nyu40_name``              :func:`clean_label` of a nyu40 id's class name
==========================  ===================================================================================

The lists are the public benchmark definitions (ScanNet ``Tasks/Benchmark`` and the ScanNet200 benchmark);
tests check them against the real ``classes_SemVoxLabel-nyu40id.txt`` and ``scannetv2-labels.combined.tsv``.
"""

from __future__ import annotations

import re

from scene3d.constants import IGNORE_LABEL

NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)

VALID_CLASS_IDS_20 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
CLASS_LABELS_20 = tuple(NYU40_CLASSES[i - 1] for i in VALID_CLASS_IDS_20)

#: ScanNet's spelling mistakes, fixed where a label is written into a sentence
LABEL_FIXES = {"refridgerator": "refrigerator"}


def clean_label(label: str) -> str:
    """``label`` as a sentence writes it: lower case, ``_`` -> space, single spaces, :data:`LABEL_FIXES`."""
    text = re.sub(r"\s+", " ", str(label).replace("_", " ")).strip().lower()
    return LABEL_FIXES.get(text, text)


def nyu40_name(nyu40: int) -> str:
    """:func:`clean_label` of nyu40 id ``nyu40``'s class (1..40)."""
    if not 1 <= int(nyu40) <= len(NYU40_CLASSES):
        raise ValueError(f"nyu40 id must lie in [1, {len(NYU40_CLASSES)}], got {nyu40}")
    return clean_label(NYU40_CLASSES[int(nyu40) - 1])


#: nyu40 ids of the classes that are structure, not objects (ScanRefer drops them from its boxes).
STRUCTURE_NYU40_IDS = (1, 2, 22)  # wall, floor, ceiling

VALID_CLASS_IDS_200 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 26, 27, 28, 29, 31, 32, 33,
    34, 35, 36, 38, 39, 40, 41, 42, 44, 45, 46, 47, 48, 49, 50, 51, 52, 54, 55, 56, 57, 58, 59, 62, 63, 64, 65,
    66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 82, 84, 86, 87, 88, 89, 90, 93, 95, 96, 97, 98,
    99, 100, 101, 102, 103, 104, 105, 106, 107, 110, 112, 115, 116, 118, 120, 121, 122, 125, 128, 130, 131, 132,
    134, 136, 138, 139, 140, 141, 145, 148, 154, 155, 156, 157, 159, 161, 163, 165, 166, 168, 169, 170, 177, 180,
    185, 188, 191, 193, 195, 202, 208, 213, 214, 221, 229, 230, 232, 233, 242, 250, 261, 264, 276, 283, 286, 300,
    304, 312, 323, 325, 331, 342, 356, 370, 392, 395, 399, 408, 417, 488, 540, 562, 570, 572, 581, 609, 748, 776,
    1156, 1163, 1164, 1165, 1166, 1167, 1168, 1169, 1170, 1171, 1172, 1173, 1174, 1175, 1176, 1178, 1179, 1180,
    1181, 1182, 1183, 1184, 1185, 1186, 1187, 1188, 1189, 1190, 1191,
)

CLASS_LABELS_200 = (
    "wall", "chair", "floor", "table", "door", "couch", "cabinet", "shelf", "desk", "office chair", "bed",
    "pillow", "sink", "picture", "window", "toilet", "bookshelf", "monitor", "curtain", "book", "armchair",
    "coffee table", "box", "refrigerator", "lamp", "kitchen cabinet", "towel", "clothes", "tv", "nightstand",
    "counter", "dresser", "stool", "cushion", "plant", "ceiling", "bathtub", "end table", "dining table",
    "keyboard", "bag", "backpack", "toilet paper", "printer", "tv stand", "whiteboard", "blanket",
    "shower curtain", "trash can", "closet", "stairs", "microwave", "stove", "shoe", "computer tower", "bottle",
    "bin", "ottoman", "bench", "board", "washing machine", "mirror", "copier", "basket", "sofa chair",
    "file cabinet", "fan", "laptop", "shower", "paper", "person", "paper towel dispenser", "oven", "blinds",
    "rack", "plate", "blackboard", "piano", "suitcase", "rail", "radiator", "recycling bin", "container",
    "wardrobe", "soap dispenser", "telephone", "bucket", "clock", "stand", "light", "laundry basket", "pipe",
    "clothes dryer", "guitar", "toilet paper holder", "seat", "speaker", "column", "bicycle", "ladder",
    "bathroom stall", "shower wall", "cup", "jacket", "storage bin", "coffee maker", "dishwasher",
    "paper towel roll", "machine", "mat", "windowsill", "bar", "toaster", "bulletin board", "ironing board",
    "fireplace", "soap dish", "kitchen counter", "doorframe", "toilet paper dispenser", "mini fridge",
    "fire extinguisher", "ball", "hat", "shower curtain rod", "water cooler", "paper cutter", "tray",
    "shower door", "pillar", "ledge", "toaster oven", "mouse", "toilet seat cover dispenser", "furniture", "cart",
    "storage container", "scale", "tissue box", "light switch", "crate", "power outlet", "decoration", "sign",
    "projector", "closet door", "vacuum cleaner", "candle", "plunger", "stuffed animal", "headphones",
    "dish rack", "broom", "guitar case", "range hood", "dustpan", "hair dryer", "water bottle", "handicap bar",
    "purse", "vent", "shower floor", "water pitcher", "mailbox", "bowl", "paper bag", "alarm clock",
    "music stand", "projector screen", "divider", "laundry detergent", "bathroom counter", "object",
    "bathroom vanity", "closet wall", "laundry hamper", "bathroom stall door", "ceiling light", "trash bin",
    "dumbbell", "stair rail", "tube", "bathroom cabinet", "cd case", "closet rod", "coffee kettle", "structure",
    "shower head", "keyboard piano", "case of water bottles", "coat rack", "storage organizer", "folded chair",
    "fire alarm", "power strip", "calendar", "poster", "potted plant", "luggage", "mattress",
)

assert len(VALID_CLASS_IDS_20) == len(CLASS_LABELS_20) == 20
assert len(VALID_CLASS_IDS_200) == len(CLASS_LABELS_200) == 200


def segment20_of_nyu40(nyu40: int) -> int:
    return _NYU40_TO_20.get(int(nyu40), IGNORE_LABEL)


def segment200_of_id(tsv_id: int) -> int:
    return _ID_TO_200.get(int(tsv_id), IGNORE_LABEL)


_NYU40_TO_20 = {c: i for i, c in enumerate(VALID_CLASS_IDS_20)}
_ID_TO_200 = {c: i for i, c in enumerate(VALID_CLASS_IDS_200)}
