"""A model ready to answer questions: weights, tokenizer, image settings, template and engine.

What `python -m llava_jax.generate`, `python -m llava_jax.chat` and evaluation share: from a model
directory and a question (or a conversation) with image files to a `Prompt` the engine can run.

Images are preprocessed by the directory's image processor (LLaVA-NeXT: anyres tiles, each image's
patches padded to the model's most), and each `<image>` expands to the tokens that image takes:
`LlavaConfig.image_layout(size).num_tokens` (a constant for LLaVA-1.5).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
from jax.sharding import Mesh

from llava_jax.config import VideoProcessorConfig
from llava_jax.data.image import ImageBatch, ImageProcessorConfig, load_image, preprocess_images
from llava_jax import anyres
from llava_jax.data.templates import IMAGE_MARKER, VIDEO_MARKER, Template, get_template, render_prompt
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.data.video import load_video
from llava_jax.inference.engine import Engine, InputError, Prompt
from llava_jax.inference.sampling import SamplingParams
from llava_jax.models.llava import LlavaModel
from llava_jax.weights import model_dir

DEFAULT_CONV_MODE = "vicuna_v1"  # what LLaVA-1.5 was trained and evaluated with


def place_image_markers(text: str, num_images: int, marker: str = IMAGE_MARKER, what: str = "image") -> str:
    """The question with one `<image>` marker per image (or `marker` per `what`: `<video>` per video).

    Without markers, `<image>\\n` per image goes in front (as the original's `model_vqa` and `cli`
    do); with markers, their number must equal the number of images.
    """
    found = text.count(marker)
    if found == 0:
        return f"{marker}\n" * num_images + text
    if found != num_images:
        raise InputError(
            f"the prompt has {found} {marker} marker{'s' * (found != 1)} but {num_images} "
            f"{what}{'s' * (num_images != 1)} were given; give one {what} per marker"
        )
    return text


class Pipeline:
    """Model + tokenizer + image processor + conversation template + engine.

    Args:
      model: a loaded `LlavaModel`.
      tokenizer: its tokenizer (sentencepiece or tokenizer.json).
      image_config: preprocessing settings (crop size must equal the vision tower's image size; anyres
        settings, with the model's pinpoints, for a LLaVA-NeXT model).
      template: conversation template (object or registry name).
      max_context: longest prompt + answer (default: the model's max_position_embeddings).
      mesh: run the engine on this device mesh (`engine.tensor_parallel_mesh`); None: one device.
      int8: weight-only int8 language model for decoding (`inference/quant.py`).
      path: the model directory, when loaded from one (names the model in answer files).
      video_config: how video frames are preprocessed (OneVision, NeXT-Video); None: the model takes no video.
    """

    def __init__(
        self,
        model: LlavaModel,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig,
        template: Template | str = DEFAULT_CONV_MODE,
        *,
        max_context: int | None = None,
        mesh: Mesh | None = None,
        int8: bool = False,
        path: str | None = None,
        video_config: VideoProcessorConfig | None = None,
    ):
        if image_config.crop_size != model.config.vision.image_size:
            raise InputError(
                f"image preprocessing crops to {image_config.crop_size} px but the vision tower takes "
                f"{model.config.vision.image_size} px; check preprocessor_config.json"
            )
        geometry = model.config.geometry
        if image_config.anyres_config(geometry.grid).resolutions() != geometry.resolutions():
            raise InputError(
                f"the image processor tiles by the pinpoints {list(image_config.grid_pinpoints)} but the model "
                f"by {list(geometry.pinpoints)} ({'anyres' if model.config.is_anyres else 'LLaVA-1.5: none'}); "
                "check image_grid_pinpoints in preprocessor_config.json"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.template = get_template(template) if isinstance(template, str) else template
        self.engine = Engine(model, tokenizer, max_context=max_context, mesh=mesh, int8=int8)
        self.path = path
        self.video_config = video_config
        if video_config is not None and video_config.frame_size != model.config.vision.image_size:
            raise InputError(f"video frames are preprocessed to {video_config.frame_size} px but the vision tower "
                             f"takes {model.config.vision.image_size} px; check the video processor settings")

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str | None = None,
        conv_mode: str = DEFAULT_CONV_MODE,
        image_aspect_ratio: str | None = None,
        max_context: int | None = None,
        scan_layers: bool | None = None,
        lora: str | None = None,
        mesh: Mesh | None = None,
        int8: bool = False,
    ) -> "Pipeline":
        """Load everything from a model directory (ours, converted, a training checkpoint, HF LLaVA or LLaVA-NeXT).

        The tokenizer is `path/tokenizer.model`, else `path/tokenizer.json` (a training checkpoint's: the
        run's, which its record names); image settings come from `preprocessor_config.json` (LLaVA-NeXT:
        LlavaNextImageProcessor's, anyres; or an original LLaVA `config.json`, or a training checkpoint's
        record), `image_aspect_ratio` ("pad" | "square") overriding them.
        `scan_layers=False` runs the layers unrolled; `lora` names a PEFT LoRA adapter directory to
        apply (see `load_pretrained`); `mesh` places the engine on a device mesh; `int8` quantises
        the language model's Linear weights for decoding.
        """
        from llava_jax.weights.load import load_pretrained  # heavy import, only when loading

        model = load_pretrained(path, dtype, lora=lora, scan_layers=scan_layers)
        tokenizer = Tokenizer.from_pretrained(model_dir.tokenizer_dir(path))
        try:
            image_config = model_dir.image_processor(path, image_aspect_ratio)
        except ValueError as e:  # e.g. LLaVA-1.5's "pad" asked of anyres settings: the user's to fix
            raise InputError(f"{path}: {e}") from None
        video_config = None
        if model.config.geometry.video:
            try:
                video_config = VideoProcessorConfig.from_pretrained(path)
            except ValueError as e:
                raise InputError(f"{path}: {e}") from None
        return cls(model, tokenizer, image_config, conv_mode, max_context=max_context, mesh=mesh, int8=int8,
                   path=path, video_config=video_config)

    @property
    def model_id(self) -> str:
        """A name for answer files: the model directory's base name when known."""
        return os.path.basename(os.path.normpath(self.path)) if self.path else "llava_jax"

    def load_images(self, paths: Sequence[str | os.PathLike]) -> ImageBatch | None:
        """Image files -> their pixels and sizes (`preprocess`; None for no files). ImageError names a bad file."""
        return self.preprocess([load_image(p) for p in paths]) if paths else None

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> ImageBatch | None:
        """One prompt's PIL images -> `ImageBatch` (None for no images): CLIP-normalised pixel_values [n, P, H, W, 3],
        each image's patches then zero patches up to P, the model's most an image can have (1 for LLaVA-1.5, so
        that batches of any images stack), and the images' (height, width). OneVision leaves the images of a
        prompt holding several untiled (one patch each)."""
        if not images:
            return None
        return preprocess_images(images, self.image_config, max_patches=self.model.config.geometry.max_patches,
                                 batch_num_images=[len(images)])

    def load_videos(self, paths: Sequence[str | os.PathLike], num_frames: int | None = None) -> list[np.ndarray]:
        """Video files -> each its sampled, preprocessed frames [F, H, W, 3] (`data.video.load_video`; F =
        `num_frames`, default the video settings'). VideoError names a bad file; InputError a model without video."""
        if not paths:
            return []
        if self.video_config is None:
            raise InputError("this model takes no video (its config has no video pooling)")
        return [load_video(p, self.video_config, num_frames) for p in paths]

    def prompt(
        self, conversations: Sequence[dict], images: ImageBatch | None = None, seed: int | None = None,
        videos: Sequence[np.ndarray] | None = None,
    ) -> Prompt:
        """A conversation ending with a user turn (LLaVA record format) -> a checked Prompt.

        `images` (`preprocess`) belong to the conversation's `<image>` markers, in order; each marker
        expands to its image's token count (OneVision: untiled when the conversation has several).
        `videos` (`load_videos`: each [F, H, W, 3]) belong to its `<video>` markers likewise.
        """
        videos = list(videos or [])
        for marker, given, what in ((IMAGE_MARKER, 0 if images is None else len(images.pixel_values), "images"),
                                    (VIDEO_MARKER, len(videos), "videos")):
            markers = sum(turn["value"].count(marker) for turn in conversations)
            if markers != given:
                raise InputError(f"the conversation has {markers} {marker} markers but {given} {what} were given")
        cfg = self.model.config
        sizes = [] if images is None else [(int(h), int(w)) for h, w in images.image_sizes]
        tiled = anyres.tiled_images(cfg.geometry, len(sizes))
        try:
            ids = render_prompt(
                conversations,
                self.template,
                self.tokenizer,
                image_token_index=cfg.image_token_index,
                num_image_tokens=[anyres.layout(cfg.geometry, size, tiled).num_tokens for size in sizes],
                video_token_index=cfg.video_token_index,
                num_video_tokens=[cfg.geometry.video_tokens(len(v)) for v in videos] if videos else [],
            )
        except ValueError as e:  # e.g. a video for a model that takes none
            raise InputError(str(e)) from None
        if images is None:
            prompt = Prompt(ids, None, seed, videos=videos or None)
        elif cfg.is_anyres:
            prompt = Prompt(ids, images.pixel_values, seed, images.image_sizes, videos=videos or None)
        else:
            prompt = Prompt(ids, images.pixel_values[:, 0], seed, videos=videos or None)  # [n, H, W, 3]
        self.engine.check(prompt)
        return prompt

    def question(self, text: str, images: ImageBatch | None = None, seed: int | None = None,
                 videos: Sequence[np.ndarray] | None = None) -> Prompt:
        """A single-turn question (markers placed by `place_image_markers`: videos first, then images, when the
        text has none) -> a checked Prompt."""
        n = 0 if images is None else len(images.pixel_values)
        text = place_image_markers(text, n)
        text = place_image_markers(text, len(videos or []), VIDEO_MARKER, "video")
        return self.prompt([{"from": "human", "value": text}], images, seed, videos)

    def sampling(self, **kw) -> SamplingParams:
        """SamplingParams with the template's stop strings added to any given."""
        stops = tuple(kw.pop("stop_strings", ())) + self.template.stop_strings
        return SamplingParams(stop_strings=stops, **kw)
