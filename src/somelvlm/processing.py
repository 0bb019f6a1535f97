"""Inputs exactly as LAVIS prepares them: images (`blip_image_eval` / `blip2_image_train`), the
Q-Former's BERT text, and the LLM's SentencePiece ids with LAVIS's special-token rules.

LLM ids are `[2] + sentencepiece.encode(prompt)`: LAVIS sets the LLaMA tokenizer's bos to `</s>`
(id 2) and appends `[PAD]` (id = number of pieces, 32000 for Vicuna). We call SentencePiece
directly because transformers 5's `LlamaTokenizer` no longer reproduces those ids.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import read_json

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

BUNDLED_BERT_VOCAB = "bert-base-uncased-vocab.txt"
BUNDLED_TINY_SPM = "tiny-llm-tokenizer.model"
SAMPLE_IMAGE = "sample.jpg"


def asset_path(name: str) -> Path:
    """Path of a file shipped in `somelvlm/assets` (bert vocab, tiny tokenizer, sample photo)."""
    return Path(str(resources.files("somelvlm").joinpath("assets", name)))


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def load_image(image: ImageInput, exif_transpose: bool = False) -> Image.Image:
    """Open a path / bytes / numpy array / PIL image as an RGB PIL image (LAVIS: `.convert("RGB")`)."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, os.PathLike)):
        try:
            img = Image.open(image)
            img.load()
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {image}") from None
        except Exception as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    elif isinstance(image, (bytes, bytearray)):
        try:
            img = Image.open(io.BytesIO(image))
            img.load()
        except Exception as e:
            raise ValueError(f"cannot decode image bytes: {e}") from None
    elif isinstance(image, np.ndarray):
        if image.dtype == np.bool_:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (H, W) or (H, W, C), got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        img = Image.fromarray(image)
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: use a path, bytes, PIL image or uint8 array")
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode == "La":  # PIL cannot convert premultiplied LA straight to RGB
        img = img.convert("LA")
    return img.convert("RGB")


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """ToTensor (uint8 -> fp32 / 255) then Normalize(CLIP mean, std), as torchvision computes them."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [H, W, 3]
    x = arr.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, H, W]
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)


def preprocess_image(image: ImageInput, image_size: int = 224, exif_transpose: bool = False) -> torch.Tensor:
    """LAVIS `blip_image_eval`: RGB, PIL bicubic squash-resize to `image_size`², /255, CLIP normalise.

    Returns `FloatTensor[3, image_size, image_size]`.
    """
    img = load_image(image, exif_transpose).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return to_normalized_tensor(img)


def train_transform(image_size: int = 224, scale: tuple[float, float] = (0.5, 1.0)):
    """LAVIS `blip2_image_train`: RandomResizedCrop(bicubic, scale 0.5-1) + horizontal flip + normalise."""
    from torchvision import transforms

    crop = transforms.RandomResizedCrop(image_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC)
    flip = transforms.RandomHorizontalFlip()

    def apply(image: ImageInput) -> torch.Tensor:
        return to_normalized_tensor(flip(crop(load_image(image))))

    return apply


# ------------------------------------------------------------------------------------------------
# Q-Former text: bert-base-uncased WordPiece + [DEC]
# ------------------------------------------------------------------------------------------------
class QFormerTokenizer:
    """BERT uncased WordPiece plus `[DEC]` (id 30522): `[CLS] ... [SEP]`, left truncation, pad 0."""

    def __init__(self, vocab_file: str | Path | None = None, max_length: int = 128) -> None:
        from tokenizers import BertWordPieceTokenizer

        self.vocab_file = Path(vocab_file) if vocab_file is not None else asset_path(BUNDLED_BERT_VOCAB)
        if self.vocab_file.is_dir():
            self.vocab_file = self.vocab_file / "vocab.txt"
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f"Q-Former vocab not found: {self.vocab_file}")
        self._tok = BertWordPieceTokenizer(str(self.vocab_file), lowercase=True)
        self._tok.add_special_tokens(["[DEC]"])  # id 30522: appended, or the vocab's last line
        self.max_length = max_length
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")
        self.pad_id = self._tok.token_to_id("[PAD]")

    def __len__(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        keep = self.max_length - 2
        if len(ids) > keep:
            ids = ids[len(ids) - keep:]  # LAVIS truncation_side="left"
        return [self.cls_id, *ids, self.sep_id]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch with right padding: `(input_ids [B, T], attention_mask [B, T])`."""
        encoded = [self.encode(t) for t in texts]
        return pad_batch(encoded, self.pad_id, side="right")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lines = self.vocab_file.read_text(encoding="utf-8").splitlines()
        if "[DEC]" not in lines:
            lines.append("[DEC]")  # make the saved vocab self-describing: 30523 entries
        (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "bos_token": "[DEC]",
                        "truncation_side": "left", "model_max_length": 512}, indent=2) + "\n"
        )


# ------------------------------------------------------------------------------------------------
# LLM text: LLaMA SentencePiece with LAVIS's special-token edits
# ------------------------------------------------------------------------------------------------
class LlamaTokenizer:
    """LAVIS's LLaMA tokenizer: prompt ids are `[2] + sp.encode(text)`; `[PAD]` = number of pieces.

    Decoding follows LAVIS `generate`: ids 0 become 2, special ids `{2, pad}` are skipped, then strip.
    """

    def __init__(self, model_file: str | Path, bos_id: int = 2, eos_id: int = 2, pad_id: int | None = None) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if self.model_file.is_dir():
            self.model_file = self.model_file / "tokenizer.model"
        if not self.model_file.is_file():
            raise FileNotFoundError(f"LLM tokenizer not found: {self.model_file} (a LLaMA tokenizer.model)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.num_pieces = self.sp.get_piece_size()
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = self.num_pieces if pad_id is None else pad_id

    def __len__(self) -> int:
        return self.num_pieces + 1  # + [PAD]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_answer(self, text: str) -> list[int]:
        """Training target `answer + '</s>'`: the slow tokenizer strips spaces left of a special token."""
        return [*self.sp.encode(text.rstrip()), self.eos_id]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [self.eos_id if int(i) == 0 else int(i) for i in ids]  # LAVIS: outputs[outputs == 0] = 2
        if skip_special:
            ids = [i for i in ids if i not in (self.eos_id, self.bos_id, self.pad_id)]
        ids = [i for i in ids if 0 <= i < self.num_pieces]
        return self.sp.decode(ids)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (folder / "tokenizer.model").resolve():
            shutil.copyfile(self.model_file, folder / "tokenizer.model")
        # What LAVIS's edited tokenizer amounts to, for tools that read these files.
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}, indent=2) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
             "pad_token": "[PAD]", "add_bos_token": True, "add_eos_token": False, "legacy": True,
             "added_tokens_decoder": {str(self.pad_id): {"content": "[PAD]", "special": True, "lstrip": False,
                                                         "rstrip": False, "normalized": False, "single_word": False}},
             "clean_up_tokenization_spaces": False, "model_max_length": 2048}, indent=2) + "\n")


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to `(ids [B, T], mask [B, T])` on the given side."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        t = torch.tensor(list(s), dtype=torch.long)
        if side == "left":
            ids[i, width - len(s):], mask[i, width - len(s):] = t, 1
        else:
            ids[i, : len(s)], mask[i, : len(s)] = t, 1
    return ids, mask


# ------------------------------------------------------------------------------------------------
# The processor
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainBatchText:
    input_ids: torch.Tensor  # [B, L] instruction + answer + </s>, right padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L] -100 on instruction and padding
    qformer_input_ids: torch.Tensor
    qformer_attention_mask: torch.Tensor


class SoMeLVLMProcessor:
    """Images and both tokenizers with LAVIS's rules; saved into / loaded from a model folder."""

    def __init__(
        self,
        llm_tokenizer: LlamaTokenizer,
        qformer_tokenizer: QFormerTokenizer | None = None,
        image_size: int = 224,
        max_txt_len: int = 128,
        max_output_txt_len: int = 256,
        exif_transpose: bool = False,
    ) -> None:
        self.llm_tokenizer = llm_tokenizer
        self.qformer_tokenizer = qformer_tokenizer or QFormerTokenizer()
        self.image_size = image_size
        self.max_txt_len = max_txt_len
        self.max_output_txt_len = max_output_txt_len
        self.exif_transpose = exif_transpose

    # -- images ----------------------------------------------------------------------------------
    def preprocess_image(self, image: ImageInput) -> torch.Tensor:
        return preprocess_image(image, self.image_size, self.exif_transpose)

    def images(self, images: Sequence[ImageInput] | ImageInput | torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` from a tensor, one image, or a list of paths / PIL images / bytes / arrays."""
        if isinstance(images, torch.Tensor):
            x = images if images.dim() == 4 else images.unsqueeze(0)
            if tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
                raise ValueError(f"pixel tensor must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
            return x
        if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
            images = [images]
        return torch.stack([self.preprocess_image(im) for im in images])

    # -- text ------------------------------------------------------------------------------------
    def qformer_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qformer_tokenizer(prompts)

    def prompts(self, prompts: Sequence[str], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """LLM prompt ids for generation: `[</s>] + pieces`, never truncated, left padded with [PAD]."""
        return pad_batch([self.llm_tokenizer.encode(p) for p in prompts], self.llm_tokenizer.pad_id, side)

    def training_text(self, prompts: Sequence[str], answers: Sequence[str]) -> TrainBatchText:
        """LAVIS `forward` text side: instruction (left-truncated) + answer + `</s>` (right-truncated),
        right padded; labels are -100 everywhere but on the answer and its `</s>`."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        tok = self.llm_tokenizer
        seqs, labels = [], []
        for p, a in zip(prompts, answers):
            body = tok.encode(p, bos=False)
            body = body[max(0, len(body) - (self.max_txt_len - 1)):]  # truncation_side="left"; </s> kept
            inp = [tok.bos_id, *body]
            out = tok.encode_answer(a)[: self.max_output_txt_len - 1]  # [</s>] + ... counted, then dropped
            seqs.append(inp + out)
            labels.append([IGNORE_INDEX] * len(inp) + out)
        ids, mask = pad_batch(seqs, tok.pad_id, "right")
        lab, _ = pad_batch(labels, IGNORE_INDEX, "right")
        q_ids, q_mask = self.qformer_text(prompts)
        return TrainBatchText(ids, mask, lab, q_ids, q_mask)

    def decode(self, ids: Iterable[int]) -> str:
        return self.llm_tokenizer.decode(ids).strip()

    # -- files -----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.llm_tokenizer.save(folder)
        self.qformer_tokenizer.save(folder / "qformer_tokenizer")
        (folder / "processor_config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": "SoMeLVLMProcessor",
            "image_size": self.image_size,
            "image_mean": list(MEAN),
            "image_std": list(STD),
            "resample": "bicubic",
            "exif_transpose": self.exif_transpose,
            "qformer_max_length": self.qformer_tokenizer.max_length,
            "max_txt_len": self.max_txt_len,
            "max_output_txt_len": self.max_output_txt_len,
            "llm_bos_id": self.llm_tokenizer.bos_id,
            "llm_eos_id": self.llm_tokenizer.eos_id,
            "llm_pad_id": self.llm_tokenizer.pad_id,
        }

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "SoMeLVLMProcessor":
        folder = Path(folder)
        cfg_path = folder / "processor_config.json"
        cfg = read_json(cfg_path, "processor config") if cfg_path.is_file() else {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
        spm_file = folder / "tokenizer.model"
        if not spm_file.is_file():
            raise FileNotFoundError(f"{spm_file} is missing: the folder needs the LLaMA SentencePiece model "
                                    "(copy tokenizer.model from the LLM folder)")
        try:
            llm = LlamaTokenizer(spm_file, bos_id=cfg.get("llm_bos_id", 2), eos_id=cfg.get("llm_eos_id", 2),
                                 pad_id=cfg.get("llm_pad_id"))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{spm_file}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        qdir = folder / "qformer_tokenizer"
        qtok = QFormerTokenizer(qdir if qdir.is_dir() else None, max_length=cfg.get("qformer_max_length", 128))
        return cls(llm, qtok, image_size=cfg.get("image_size", 224), max_txt_len=cfg.get("max_txt_len", 128),
                   max_output_txt_len=cfg.get("max_output_txt_len", 256),
                   exif_transpose=cfg.get("exif_transpose", False))

    @classmethod
    def tiny(cls, image_size: int = 56) -> "SoMeLVLMProcessor":
        """The bundled processor of the `tiny` preset (2,000-piece SentencePiece model)."""
        return cls(LlamaTokenizer(asset_path(BUNDLED_TINY_SPM)), QFormerTokenizer(), image_size=image_size)
