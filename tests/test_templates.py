"""coop_min.templates against entries typed by hand from CoOp's trainers/zsclip.py and
trainers/imagenet_templates.py (OpenAI's Prompt_Engineering_for_ImageNet notebook)."""
from coop_min.templates import CUSTOM_TEMPLATES, IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT, templates_for

OFFICIAL = ["OxfordPets", "OxfordFlowers", "FGVCAircraft", "DescribableTextures", "EuroSAT", "StanfordCars",
            "Food101", "SUN397", "Caltech101", "UCF101", "ImageNet", "ImageNetSketch", "ImageNetV2",
            "ImageNetA", "ImageNetR"]


def test_counts_and_placeholders():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(IMAGENET_TEMPLATES_SELECT) == 7 and set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES)
    assert set(OFFICIAL) <= set(CUSTOM_TEMPLATES)
    for t in IMAGENET_TEMPLATES + list(CUSTOM_TEMPLATES.values()):
        assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1, t


def test_verbatim_entries():
    assert IMAGENET_TEMPLATES[:3] == ["a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}."]
    assert IMAGENET_TEMPLATES[39] == "a photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert IMAGENET_TEMPLATES_SELECT == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                                         "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                                         "a photo of the small {}."]
    assert CUSTOM_TEMPLATES["DescribableTextures"] == "{} texture."
    assert CUSTOM_TEMPLATES["EuroSAT"] == "a centered satellite photo of {}."
    assert CUSTOM_TEMPLATES["Food101"] == "a photo of {}, a type of food."
    assert CUSTOM_TEMPLATES["UCF101"] == "a photo of a person doing {}."
    assert CUSTOM_TEMPLATES["FGVCAircraft"] == "a photo of a {}, a type of aircraft."


def test_templates_for_single_and_ensemble_as_zeroshot_clip2():
    assert templates_for("OxfordPets") == ["a photo of a {}, a type of pet."]
    assert templates_for("ImageNet", ensemble=True) == IMAGENET_TEMPLATES_SELECT  # 7: only "ImageNet" skips custom
    assert templates_for("ImageNetA", ensemble=True) == IMAGENET_TEMPLATES_SELECT + ["a photo of a {}."]
    assert templates_for("EuroSAT", ensemble=True)[-1] == "a centered satellite photo of {}."
    assert len(templates_for("EuroSAT", ensemble=True)) == 8
    assert templates_for("imagefolder") == ["a photo of a {}."]
    templates_for("Caltech101", ensemble=True).append("x")  # the official code mutates its list; ours must not
    assert len(IMAGENET_TEMPLATES_SELECT) == 7
