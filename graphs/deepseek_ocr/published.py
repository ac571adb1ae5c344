"""What the vendor published about DeepSeek-OCR's size, to set beside our exact counts (SPEC section 5),
and the named parts of the checkpoint they refer to."""

# parameters: DeepEncoder about 380M (SAM about 80M, CLIP about 300M); decoder "3B MoE, 570M active"
PUBLISHED = {"vision": 380e6, "vision.sam": 80e6, "vision.clip": 300e6, "decoder": 3e9, "decoder.active": 570e6}

# parts of the vision encoder counted apart: name -> (scope, module path prefix); one view's modules
PARAM_PARTS = {"vision_parts": {"sam": ("vision.global", "sam."), "clip": ("vision.global", "clip."),
                                "projector": ("vision.global", "projector")}}
