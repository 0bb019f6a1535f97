"""Images and both tokenizers against independent references of LAVIS's rules."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_shared, shared_path
from somelvlm.processing import (MEAN, STD, LlamaTokenizer, QFormerTokenizer, SoMeLVLMProcessor, asset_path,
                                 preprocess_image)


def lavis_eval_reference(img: Image.Image, size: int = 224) -> torch.Tensor:
    """LAVIS blip_image_eval written with torchvision (what LAVIS itself calls)."""
    from torchvision import transforms

    t = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    return t(img.convert("RGB"))


def synthetic(mode: str, size=(37, 23)) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((size[1], size[0]), dtype=np.float32) * 255)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_pil_mode_matches_lavis_formula(mode):
    img = synthetic(mode)
    assert img.mode == mode
    ours = preprocess_image(img, 224)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, lavis_eval_reference(img))


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "chelsea.png"])
def test_real_photo_matches_lavis_formula(name):
    path = require_shared("assets", "images", name)
    assert torch.equal(preprocess_image(path), lavis_eval_reference(Image.open(path)))


def test_all_input_kinds_agree(tmp_path):
    img = synthetic("RGB", (50, 40))
    path = tmp_path / "x.png"
    img.save(path)
    ref = preprocess_image(img, 56)
    for kind in (path, str(path), path.read_bytes(), np.asarray(img)):
        assert torch.equal(preprocess_image(kind, 56), ref), type(kind)
    assert torch.equal(preprocess_image(np.asarray(img.convert("L")), 56), preprocess_image(img.convert("L"), 56))


def test_bad_images_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        preprocess_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        preprocess_image(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="must be uint8"):
        preprocess_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="unsupported image type"):
        preprocess_image(42)


def test_exif_orientation_off_by_default_on_by_option():
    img = synthetic("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    data = buf.getvalue()
    assert torch.equal(preprocess_image(data, 56), preprocess_image(img, 56))  # LAVIS ignores EXIF
    rotated = img.transpose(Image.Transpose.ROTATE_270)
    assert torch.equal(preprocess_image(data, 56, exif_transpose=True), preprocess_image(rotated, 56))


# ------------------------------------------------------------------------------------------------
# Q-Former text
# ------------------------------------------------------------------------------------------------
def somedata_prompts(limit_per_file: int = 25) -> list[str]:
    folder = shared_path("somedata", "in_domain")
    if not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.glob("*.json")):
        out += [s["text_input"] for s in json.loads(f.read_text())[:limit_per_file]]
    return out


EXTRA_PROMPTS = ["Héllo, WORLD!! [DEC] 🙂 naïve café 東京 don't", "", "   spaced   out   ", "#hashtag @user HTTPURL"]


def test_qformer_ids_match_transformers_bert_with_left_truncation():
    from transformers import BertTokenizer

    vocab = asset_path("bert-base-uncased-vocab.txt")
    ref = BertTokenizer(vocab=str(vocab))
    ref.add_special_tokens({"bos_token": "[DEC]"})
    ref.truncation_side = "left"
    ours = QFormerTokenizer()
    assert len(ours) == len(ref) == 30523
    prompts = somedata_prompts() + EXTRA_PROMPTS
    long = " ".join(["word"] * 300) + " final question?"
    for p in prompts + [long]:
        want = ref(p, truncation=True, max_length=128)["input_ids"]
        assert ours.encode(p) == want, p[:80]
    assert len(ours.encode(long)) == 128 and ours.encode(long)[-3:] == ref("question?")["input_ids"][-3:]


def test_qformer_batch_is_right_padded():
    ids, mask = QFormerTokenizer()(["a b c", "a"])
    assert ids.tolist()[1][-2:] == [0, 0] and mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


# ------------------------------------------------------------------------------------------------
# LLM text
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_spm(tmp_path_factory) -> Path:
    """A tiny SentencePiece model trained here, with LLaMA's settings (byte fallback, unk/bos/eos 0/1/2)."""
    import sentencepiece as spm

    text = ["This image is associated with the following caption by a user.",
            "Is the user likely to be male or female? Pick your answer from [male, female].",
            "What sentiment does this combination convey? positive, neutral, negative",
            "The quick brown fox jumps over the lazy dog 0123456789 times!"] * 20
    path = tmp_path_factory.mktemp("spm") / "t.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=f, vocab_size=400,
                                       model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                       pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
                                       normalization_rule_name="identity", minloglevel=2)
    return path


def llama_tokenizer_dirs(trained: Path) -> list[Path]:
    dirs = [trained]
    env = os.environ.get("SOMELVLM_LLAMA_TOKENIZER")
    if env and (Path(env) / "tokenizer.model").is_file():
        dirs.append(Path(env) / "tokenizer.model")
    return dirs


def test_prompt_ids_are_2_plus_sentencepiece(trained_spm):
    import sentencepiece as spm

    prompts = somedata_prompts() + EXTRA_PROMPTS + ["Pick from: [true, false]", "line1\nline2\ttab"]
    for model_file in llama_tokenizer_dirs(trained_spm):
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        tok = LlamaTokenizer(model_file)
        assert tok.pad_id == sp.get_piece_size()
        for p in prompts:
            assert tok.encode(p) == [2] + sp.encode(p), p[:60]


def test_real_llama_tokenizer_known_ids():
    env = os.environ.get("SOMELVLM_LLAMA_TOKENIZER")
    if not env or not (Path(env) / "tokenizer.model").is_file():
        pytest.skip("set SOMELVLM_LLAMA_TOKENIZER to a folder built by shared/assets/llama-tokenizer/build.sh")
    tok = LlamaTokenizer(Path(env) / "tokenizer.model")
    assert tok.num_pieces == 32000 and tok.pad_id == 32000
    ids = tok.encode("Is this image hateful?")
    assert ids[0] == 2 and tok.decode(ids) == "Is this image hateful?"


def test_generation_layout_left_pads_with_pad_id(trained_spm):
    proc = SoMeLVLMProcessor(LlamaTokenizer(trained_spm))
    ids, mask = proc.prompts(["male", "the user is male or female"])
    pad = proc.llm_tokenizer.pad_id
    assert ids[0, 0] == pad and mask[0, 0] == 0 and ids[1, 0] == 2 and mask[1].all()
    assert ids[0][mask[0].bool()].tolist()[0] == 2


def test_training_text_truncation_and_labels(trained_spm):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(trained_spm))
    proc = SoMeLVLMProcessor(LlamaTokenizer(trained_spm), max_txt_len=10, max_output_txt_len=6)
    prompt = "The quick brown fox jumps over the lazy dog 0123456789 times!"
    answers = ["positive", "male or female or male or female"]
    b = proc.training_text([prompt, "Is it?"], answers)
    body = sp.encode(prompt)[-9:]  # left truncation keeps the leading </s>
    assert b.input_ids[0, :10].tolist() == [2] + body
    out0 = (sp.encode("positive") + [2])[:5]
    assert b.input_ids[0, 10:10 + len(out0)].tolist() == out0
    assert b.labels[0].tolist()[:10] == [-100] * 10 and b.labels[0, 10:10 + len(out0)].tolist() == out0
    out1 = (sp.encode(answers[1]) + [2])[:5]  # right truncation at 6 - 1 (LAVIS drops the answer's </s> bos)
    n1 = 1 + len(sp.encode("Is it?"))
    assert b.input_ids[1, n1:n1 + 5].tolist() == out1 and 2 not in out1
    pad = proc.llm_tokenizer.pad_id
    row0_len = 10 + len(out0)
    assert (b.input_ids[0, row0_len:] == pad).all() and (b.labels[0, row0_len:] == -100).all()
    assert (b.attention_mask.sum(1) == torch.tensor([row0_len, n1 + 5])).all()


def test_decode_follows_lavis(trained_spm):
    tok = LlamaTokenizer(trained_spm)
    ids = tok.encode("positive answer", bos=False)
    assert tok.decode([0, 2] + ids + [2, tok.pad_id, tok.pad_id]) == tok.sp.decode(ids)
    assert tok.decode([1] + ids) == tok.sp.decode(ids)  # <s> decodes to nothing


def test_processor_round_trip(tmp_path):
    proc = SoMeLVLMProcessor.tiny()
    proc.save_pretrained(tmp_path)
    again = SoMeLVLMProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict()
    assert again.qformer_tokenizer.encode("hello [DEC]") == proc.qformer_tokenizer.encode("hello [DEC]")
    assert again.llm_tokenizer.encode("hello") == proc.llm_tokenizer.encode("hello")
