"""Constants shared across the package: one place for ids, names and format versions."""

#: Label value ignored by losses and metrics (as Hugging Face and Pointcept use).
IGNORE_INDEX = -100
#: Semantic / instance value for "no label" in processed scenes.
IGNORE_LABEL = -1

#: Version of the processed-scene directory layout written by ``data_prep``.
PROCESSED_FORMAT_VERSION = 1

#: Object identifier token template (Chat-3D v2 style) and the default number of identifiers.
OBJ_TOKEN_TEMPLATE = "<OBJ{:03d}>"
DEFAULT_NUM_OBJ_TOKENS = 200
SEG_TOKEN = "[SEG]"
#: Placeholder token whose embedding is replaced by an object token when splicing.
OBJ_PLACEHOLDER = "<obj_feat>"

#: File names of a processed scene (Pointcept-compatible).
SCENE_ARRAYS = {
    "coord": "coord.npy",
    "color": "color.npy",
    "normal": "normal.npy",
    "superpoint": "superpoint.npy",
    "segment20": "segment20.npy",
    "segment200": "segment200.npy",
    "instance": "instance.npy",
}
OBJECTS_FILE = "objects.json"
META_FILE = "meta.json"

#: Environment variable locating the real ScanNet / ScanRefer / ReferIt3D subsets.
REAL_DATA_ENV = "SCENE3D_REAL_DATA"
