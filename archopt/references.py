"""Figures as the lecture and the papers print them: what the tour and the tests compare to.

Only data lives here; nothing in archopt computes its results from these numbers.
"""

from __future__ import annotations

# The lecture's Table 1 (MobileNet body), rows as (type / stride, filter shape, input size),
# with "5x" expanded. Row 26 (index 25) is printed "Conv dw / s2"; the real network (TF-slim,
# timm, HF) has stride 1 there: MOBILENET_V1_TABLE1_ERRATA records it.
_FIVE = [("Conv dw / s1", "3x3x512 dw", "14x14x512"), ("Conv / s1", "1x1x512x512", "14x14x512")]
MOBILENET_V1_TABLE1: list[tuple[str, str, str]] = [
    ("Conv / s2", "3x3x3x32", "224x224x3"),
    ("Conv dw / s1", "3x3x32 dw", "112x112x32"),
    ("Conv / s1", "1x1x32x64", "112x112x32"),
    ("Conv dw / s2", "3x3x64 dw", "112x112x64"),
    ("Conv / s1", "1x1x64x128", "56x56x64"),
    ("Conv dw / s1", "3x3x128 dw", "56x56x128"),
    ("Conv / s1", "1x1x128x128", "56x56x128"),
    ("Conv dw / s2", "3x3x128 dw", "56x56x128"),
    ("Conv / s1", "1x1x128x256", "28x28x128"),
    ("Conv dw / s1", "3x3x256 dw", "28x28x256"),
    ("Conv / s1", "1x1x256x256", "28x28x256"),
    ("Conv dw / s2", "3x3x256 dw", "28x28x256"),
    ("Conv / s1", "1x1x256x512", "14x14x256"),
    *_FIVE * 5,
    ("Conv dw / s2", "3x3x512 dw", "14x14x512"),
    ("Conv / s1", "1x1x512x1024", "7x7x512"),
    ("Conv dw / s2", "3x3x1024 dw", "7x7x1024"),
    ("Conv / s1", "1x1x1024x1024", "7x7x1024"),
    ("Avg Pool / s1", "Pool 7x7", "7x7x1024"),
    ("FC / s1", "1024x1000", "1x1x1024"),
    ("Softmax / s1", "Classifier", "1x1x1000"),
]
# row index (0-based) -> the row as the real network has it
MOBILENET_V1_TABLE1_ERRATA = {25: ("Conv dw / s1", "3x3x1024 dw", "7x7x1024")}

# Paper Table 2: share of MACs and of parameters by layer type (percent).
MOBILENET_V1_TABLE2 = {
    "Conv 1x1": (94.86, 74.59),
    "Conv DW 3x3": (3.06, 1.06),
    "Conv 3x3": (1.19, 0.02),
    "Fully Connected": (0.18, 24.33),
}
# Paper Table 4: (million mult-adds, million parameters).
MOBILENET_V1_TABLE4 = {"conv_mobilenet": (4866, 29.3), "mobilenet": (569, 4.2)}
# Paper Table 6, width multiplier alpha at 224: alpha -> (million mult-adds, million params).
MOBILENET_V1_TABLE6 = {1.0: (569, 4.2), 0.75: (325, 2.6), 0.5: (149, 1.3), 0.25: (41, 0.5)}
# Paper Table 7, resolution at alpha 1.0: resolution -> (million mult-adds, million params).
MOBILENET_V1_TABLE7 = {224: (569, 4.2), 192: (418, 4.2), 160: (290, 4.2), 128: (186, 4.2)}
# Exact counts of the released network (timm mobilenetv1_100): DESIGN.md anchors.
MOBILENET_V1_100_PARAMS = 4_231_976
MOBILENET_V1_100_PARAMS_NO_BN = 4_210_088
MOBILENET_V1_100_MACS = 568_740_352
