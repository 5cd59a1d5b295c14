"""Labelling tools' exports (COCO, LabelMe, CVAT masks) read as data sets: the same small data set in each
format gives identical label tensors, the rules of data/labelling.py hold, and bad files get one line."""

import base64
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, build_dataset
from helpers import random_image

mask_api = pytest.importorskip("pycocotools.mask")

H, W = 40, 56
CLASSES = ["background", "cat", "dog"]
COLOURS = [(0, 0, 0), (250, 50, 83), (61, 245, 61)]
# Per image, LabelMe shapes (label, type, points); the COCO file holds the same as polygons.
SHAPES = [
    [("cat", "polygon", [[4, 4], [30, 6], [16, 30]]), ("dog", "rectangle", [[34, 10], [50, 35]])],
    [("dog", "circle", [[28, 20], [28, 32]]), ("cat", "polygon", [[20, 14], [36, 14], [36, 26], [20, 26]])],
    [("cat", "rectangle", [[0, 0], [40.5, 39.5]]), ("dog", "polygon", [[10, 10], [20, 10], [15, 25]])],
]


def labelme2coco_polygon(kind, points):
    """labelme's published labelme2coco conversion of a shape to one polygon, written out for the test."""
    if kind == "rectangle":
        (x1, y1), (x2, y2) = points
        x1, x2 = sorted([x1, x2])
        y1, y2 = sorted([y1, y2])
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    if kind == "circle":
        (x1, y1), (x2, y2) = points
        r = math.hypot(x2 - x1, y2 - y1)
        n = max(int(math.pi / math.acos(1 - 1 / r)), 12)
        return [v for i in range(n) for v in (x1 + r * math.sin(2 * math.pi / n * i),
                                              y1 + r * math.cos(2 * math.pi / n * i))]
    return [float(v) for p in points for v in p]


def truth(image_shapes):
    """The label map pycocotools' masks give, largest shape drawn first (the COCO rule)."""
    label = np.zeros((H, W), np.uint8)
    masks = [(mask_api.decode(mask_api.merge(mask_api.frPyObjects([labelme2coco_polygon(kind, pts)], H, W))),
              CLASSES.index(name)) for name, kind, pts in image_shapes]
    for mask, class_id in sorted(masks, key=lambda m: -int(m[0].sum())):
        label[mask.astype(bool)] = class_id
    return label


def coco_json(images, shapes, *, extra_annotations=()):
    annotations = []
    for image_id, image_shapes in enumerate(shapes, 1):
        for name, kind, points in image_shapes:
            polygon = labelme2coco_polygon(kind, points)
            area = float(mask_api.area(mask_api.merge(mask_api.frPyObjects([polygon], H, W))))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CLASSES.index(name),
                                "segmentation": [polygon], "area": area, "iscrowd": 0, "bbox": [0, 0, 1, 1]})
    annotations += list(extra_annotations)
    return {"images": [{"id": i, "file_name": name, "height": H, "width": W} for i, name in enumerate(images, 1)],
            "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES) if i],
            "annotations": annotations}


def write_all_formats(root, shapes=SHAPES):
    names = [f"img{i}.png" for i in range(len(shapes))]
    pictures = [random_image(H, W, seed=i) for i in range(len(shapes))]
    labels = [truth(s) for s in shapes]
    # 1. index PNGs, mmseg's layout with a manifest
    for sub in ("img_dir", "ann_dir"):
        (root / "index" / sub).mkdir(parents=True)
    for name, picture, label in zip(names, pictures, labels):
        picture.save(root / "index" / "img_dir" / name)
        Image.fromarray(label).save(root / "index" / "ann_dir" / name)
    (root / "index" / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    # 2. COCO as CVAT exports it: images/ + annotations/instances_default.json
    (root / "coco" / "images").mkdir(parents=True)
    (root / "coco" / "annotations").mkdir()
    for name, picture in zip(names, pictures):
        picture.save(root / "coco" / "images" / name)
    (root / "coco" / "annotations" / "instances_default.json").write_text(json.dumps(coco_json(names, shapes)))
    # 3. Roboflow: train/_annotations.coco.json beside the images
    (root / "roboflow" / "train").mkdir(parents=True)
    for name, picture in zip(names, pictures):
        picture.save(root / "roboflow" / "train" / name)
    (root / "roboflow" / "train" / "_annotations.coco.json").write_text(json.dumps(coco_json(names, shapes)))
    # 4. LabelMe: one JSON per image; the last one holds its image (imageData) instead of pointing to a file
    (root / "labelme").mkdir()
    (root / "labelme" / "labels.txt").write_text("__ignore__\n_background_\ncat\ndog\n")
    for i, (name, picture, image_shapes) in enumerate(zip(names, pictures, shapes)):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        embedded = i == len(names) - 1
        if not embedded:
            picture.save(root / "labelme" / name)
        document = {"version": "5.4.1", "flags": {}, "imagePath": name, "imageHeight": H, "imageWidth": W,
                    "imageData": base64.b64encode(buffer.getvalue()).decode() if embedded else None,
                    "shapes": [{"label": label, "points": pts, "shape_type": kind, "group_id": None, "flags": {}}
                               for label, kind, pts in image_shapes]}
        (root / "labelme" / name.replace(".png", ".json")).write_text(json.dumps(document))
    # 5. CVAT's Segmentation mask 1.1: colour masks and labelmap.txt
    cvat = root / "cvat"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (cvat / sub).mkdir(parents=True)
    (cvat / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "".join(
        f"{n}:{r},{g},{b}::\n" for n, (r, g, b) in zip(CLASSES, COLOURS)))
    for name, picture, label in zip(names, pictures, labels):
        picture.save(cvat / "JPEGImages" / name)
        Image.fromarray(np.asarray(COLOURS, np.uint8)[label]).save(cvat / "SegmentationClass" / name)
    (cvat / "ImageSets" / "Segmentation" / "default.txt").write_text("\n".join(n[:-4] for n in names) + "\n")
    # 6. and 7. the same files where no layout would find them, named by a dataset.json
    named = root / "named"
    (named / "pictures").mkdir(parents=True)
    for name, picture in zip(names, pictures):
        picture.save(named / "pictures" / name)
    (named / "export.json").write_text(json.dumps(coco_json(names, shapes)))
    splits = {"train": {"images": "pictures", "coco": "export.json"}}
    (named / "dataset.json").write_text(json.dumps({"splits": splits}))
    shutil.copytree(root / "labelme", root / "named_labelme" / "drawn")
    (root / "named_labelme" / "dataset.json").write_text(json.dumps({"classes": CLASSES,
                                                                      "splits": {"train": {"labelme": "drawn"}}}))
    return labels


def read_labels(folder):
    dataset = build_dataset(str(folder), "train", test_size=0)
    return dataset.class_names, [dataset.load(i)[1] for i in range(len(dataset))], dataset.samples.layout


def test_every_export_of_the_same_data_gives_identical_label_tensors(tmp_path, capsys):
    from data.__main__ import main as doctor
    labels = write_all_formats(tmp_path)
    names, expected, _ = read_labels(tmp_path / "index")
    assert names == CLASSES and [t.numpy().tolist() for t in expected] == [lb.tolist() for lb in labels]
    assert all(len(np.unique(lb)) == 3 for lb in labels)  # every class in every image: nothing hides
    for fmt, layout in (("coco", "COCO annotations"), ("roboflow", "COCO annotations"),
                        ("labelme", "LabelMe folder"), ("cvat", "CVAT Segmentation mask 1.1 export"),
                        ("named", "dataset.json"), ("named_labelme", "dataset.json")):
        names, got, found = read_labels(tmp_path / fmt)
        assert found.endswith(layout) and names == CLASSES, fmt
        assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == len(expected), fmt
        assert doctor([str(tmp_path / fmt)]) == 0
        assert layout in capsys.readouterr().out


def test_coco_rules_rle_crowd_uncovered_and_overlap_order(tmp_path):
    hand = np.zeros((H, W), np.uint8, order="F")
    hand[5:15, 7:30] = 1
    hand[20, 3] = 1  # a lone pixel: RLE is exact
    rle = mask_api.encode(np.asfortranarray(hand))
    rle["counts"] = rle["counts"].decode()
    crowd = {"id": 90, "image_id": 1, "category_id": 2, "iscrowd": 1, "area": float(hand.sum()), "bbox": [0, 0, 1, 1],
             "segmentation": {"size": [H, W], "counts": rle["counts"]}}
    shapes = [[("cat", "rectangle", [[2, 2], [50, 38]]), ("dog", "rectangle", [[10, 10], [20, 20]])]]
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    random_image(H, W).save(tmp_path / "images" / "img0.png")
    document = coco_json(["img0.png"], shapes, extra_annotations=[crowd])
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(document))
    labels = build_dataset(str(tmp_path), "train", test_size=0).load(0)[1].numpy()
    dog = labelme2coco_polygon("rectangle", [[10, 10], [20, 20]])
    small = mask_api.decode(mask_api.frPyObjects([dog], H, W))[..., 0]
    assert (labels[hand == 1] == 255).all()  # the crowd region, drawn exactly from its RLE, is ignored
    assert (labels[(small == 1) & (hand == 0)] == 2).all()  # the smaller dog lies on the larger cat
    (tmp_path / "dataset.json").write_text(json.dumps({"uncovered": "ignore", "crowd": "label"}))
    dataset = build_dataset(str(tmp_path), "train", test_size=0)
    labels = dataset.load(0)[1].numpy()
    assert dataset.class_names == ["cat", "dog"]  # no background class: categories from 0
    assert labels[0, 0] == 255 and (labels[hand == 1] == 1).all()  # uncovered ignored; the crowd is a dog
    (tmp_path / "dataset.json").write_text(json.dumps({"crowd": "sometimes"}))
    with pytest.raises(DataError, match=r"dataset.json: key 'crowd' must be one of 'ignore', 'label'"):
        build_dataset(str(tmp_path), "train", test_size=0)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0]["segmentation"][0].__setitem__(0, 300.0),
     r"instances_train.json annotation id 1 \(image img0.png\): polygon point \(300, 4\) is outside the 56x40 image"),
    (lambda d: d["annotations"][1].__setitem__("category_id", 7),
     r"instances_train.json: annotation id 2: category_id 7 is not one of the file's categories \[1, 2\]"),
    (lambda d: d["images"].append({"id": 9, "file_name": "gone.png", "height": H, "width": W}),
     r"instances_train.json: image id 9, gone.png: not in .*images"),
])
def test_a_bad_coco_file_is_one_line_naming_file_and_annotation(change, message, tmp_path, capsys):
    import train
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in range(2):
        random_image(H, W, seed=i).save(tmp_path / "images" / f"img{i}.png")
    document = coco_json(["img0.png", "img1.png"], SHAPES[:2])
    change(document)
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(document))
    code = train.main(["--data", str(tmp_path), "--max-steps", "1", "--out", str(tmp_path / "run"), "--no-plots",
                       "--size", "32"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert __import__("re").search(message, errors[0]), errors[0]


def test_labelme_rules_ignore_label_later_shapes_on_top_and_unknown_labels(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    random_image(H, W).save(folder / "a.png")
    shapes = [{"label": "cat", "shape_type": "rectangle", "points": [[0, 0], [30, 30]]},
              {"label": "dog", "shape_type": "rectangle", "points": [[0, 0], [10, 10]]},
              {"label": "__ignore__", "shape_type": "polygon", "points": [[40, 0], [50, 0], [50, 10]]},
              {"label": "cat", "shape_type": "line", "points": [[0, 39], [55, 39]]}]
    document = {"imagePath": "a.png", "imageData": None, "imageHeight": H, "imageWidth": W, "shapes": shapes}
    (folder / "a.json").write_text(json.dumps(document))
    dataset = build_dataset(str(folder), "train", test_size=0)
    labels = dataset.load(0)[1].numpy()
    assert dataset.class_names == ["background", "cat", "dog"]  # sorted labels after the background
    assert labels[5, 5] == 2 and labels[20, 20] == 1 and labels[2, 47] == 255 and labels[39, 30] == 0
    shapes.append({"label": "cow", "shape_type": "polygon", "points": [[0, 0], [5, 0], [5, 5]]})
    (folder / "a.json").write_text(json.dumps(document))
    (folder / "labels.txt").write_text("_background_\ncat\ndog\n")
    with pytest.raises(DataError, match=r"a.json shape 4 \('cow'\): label 'cow' is not a class"):
        build_dataset(str(folder), "train", test_size=0).load(0)


def test_one_sample_in_one_split_cannot_be_held_out_and_says_so(tmp_path):
    (tmp_path / "lm").mkdir()
    random_image(H, W).save(tmp_path / "lm" / "a.png")
    (tmp_path / "lm" / "a.json").write_text(json.dumps({"imagePath": "a.png", "imageHeight": H, "imageWidth": W,
                                                         "shapes": []}))
    with pytest.raises(DataError, match=r"lm: 1 sample in one split cannot be divided into training and validation"):
        build_dataset(str(tmp_path / "lm"), "train", train=True)  # was datasets' raw ValueError


# ---- predictions out, and back in --------------------------------------------------------------------------

def scene_labels(count=4):
    from data.synthetic import render_scene
    return [render_scene(np.random.default_rng([7, i]), 96)[1] for i in range(count)]  # nested, holed regions


def redraw_labelme(document, class_names):
    from data.labelling import polygon_mask
    height, width = document["imageHeight"], document["imageWidth"]
    out = np.full((height, width), 255, np.uint8)
    for shape in document["shapes"]:
        out[polygon_mask([[v for p in shape["points"] for v in p]], height, width)] = class_names.index(shape["label"])
    return out


def test_label_maps_go_out_as_coco_rle_exactly_and_as_labelme_polygons_within_tolerance():
    from data.labelling import coco_annotations, labelme_document
    names = [str(k) for k in range(8)]
    agreement = []
    for label in scene_labels():
        back = np.full_like(label, 255)
        for annotation in coco_annotations(label, 1, 1):
            back[mask_api.decode(annotation["segmentation"]).astype(bool)] = annotation["category_id"] - 1
        assert np.array_equal(back, label)  # RLE: exact
        exact = redraw_labelme(labelme_document(label, "x.png", names, tolerance=0), names)
        assert np.array_equal(exact, label)  # every boundary corner: exact, holes included
        simplified = labelme_document(label, "x.png", names, tolerance=0.5)
        agreement.append((redraw_labelme(simplified, names) == label).mean())
    assert min(agreement) >= 0.985, agreement  # within half a pixel of the boundary (measured 0.991-0.994)


def test_infer_writes_coco_and_labelme_that_read_back_as_the_predicted_masks(tmp_path):
    import infer
    from segformer import SegFormer
    torch.manual_seed(1)  # weights that predict all three classes on these images (thousands of pixels each)
    model = SegFormer.from_variant("b0", num_labels=3, id2label={0: "sky", 1: "sea", 2: "boat"})
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "photos" / "harbour").mkdir(parents=True)
    for i in range(2):
        random_image(48, 64, seed=i).save(tmp_path / "photos" / "harbour" / f"p{i}.png")
    args = ["--checkpoint", str(tmp_path / "model"), str(tmp_path / "photos"), "--out", str(tmp_path / "pred"),
            "--size", "64", "--format", "coco", "labelme", "--polygon-tolerance", "0"]
    assert infer.main(infer.get_args(args)) == 0
    masks = [np.asarray(Image.open(tmp_path / "pred" / "harbour" / f"p{i}_mask.png")) for i in range(2)]
    assert len(np.unique(np.stack(masks))) == 3  # every class predicted somewhere: ids cannot hide

    coco = json.loads((tmp_path / "pred" / "predictions.coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["sky", "sea", "boat"]
    assert [i["file_name"] for i in coco["images"]] == ["harbour/p0.png", "harbour/p1.png"]
    dataset = tmp_path / "as_coco"
    (dataset / "annotations").mkdir(parents=True)
    (dataset / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    (dataset / "images").symlink_to(tmp_path / "photos")
    (dataset / "dataset.json").write_text(json.dumps({"uncovered": "ignore"}))  # every pixel is predicted
    read = build_dataset(str(dataset), "train", test_size=0)
    assert read.class_names == ["sky", "sea", "boat"]
    assert all(np.array_equal(read.load(i)[1].numpy(), masks[i]) for i in range(2))

    with pytest.raises(DataError, match=r"2 file\(s\) named by the data lie outside the folder"):
        build_dataset(str(tmp_path / "pred" / "labelme"), "train", test_size=0)  # they name the photos where they are
    read = build_dataset(str(tmp_path / "pred" / "labelme"), "train", test_size=0, allow_outside=True)
    assert read.class_names == ["sky", "sea", "boat"]  # labels.txt keeps the ids
    assert all(np.array_equal(read.load(i)[1].numpy(), masks[i]) for i in range(2))


def test_every_structural_problem_of_a_coco_file_is_named_and_the_doctor_lists_them_all(tmp_path, capsys):
    """What pycocotools took silently (an image id used twice: one image dropped, its annotations drawn on
    the other) or failed on with a traceback, each kind named by its entry; train.py stops at the first in
    one line, `python -m data doctor` lists them all."""
    import train
    from data.__main__ import main as doctor
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in range(2):
        random_image(H, W, seed=i).save(tmp_path / "images" / f"img{i}.png")
    document = coco_json(["img0.png", "img1.png"], SHAPES[:2])
    document["images"].append({"id": 2, "file_name": "img1.png", "height": H, "width": W})  # id 2 again
    document["images"].append({"id": 3, "file_name": "img0.png", "width": W})  # no height
    document["images"].append({"id": 4, "file_name": "img0.png", "height": 200000, "width": 200000})  # a bomb
    document["annotations"][0]["area"] = "12"
    document["annotations"][1]["segmentation"] = []
    document["annotations"][2]["segmentation"] = [[1, 2, "x", 4, 5, 6]]
    document["categories"].append({"id": 9, "name": "cat"})  # a name twice: a class would vanish
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(document))
    expected = [r"image id 2: the id is used by two images \('img1.png' and 'img1.png'\)",
                r"image id 3: \"height\" and \"width\" must be positive integers, got \[None, 56\]",
                r"image id 4: declares 200000x200000 pixels, more than the [\d,]+ an image may have",
                r"category id 9: the name 'cat' is another category's too",
                r"annotation id 1: \"area\" must be a number, got '12'",
                r"annotation id 2: \"segmentation\" must be polygons",
                r"annotation id 3: \"segmentation\" must be polygons"]
    assert doctor([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for message in expected:
        assert __import__("re").search(r"instances_train.json: " + message, out), message
    assert "7 problem(s) found" in out
    code = train.main(["--data", str(tmp_path), "--max-steps", "1", "--out", str(tmp_path / "run"), "--no-plots",
                       "--size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "image id 2: the id is used by two images" in err and "(and 6 more: python -m data doctor" in err


def test_every_problem_of_labelme_files_a_labelmap_and_a_manifest_is_listed_at_once(tmp_path, capsys):
    """The doctor stopped at the first bad LabelMe file (of a folder of hundreds), the first bad line of a
    labelmap.txt and the first bad key of a dataset.json; now each lists them all, and train.py names the first
    in one line with how many more there are. 300 CVAT labels made a colour table the doctor named without its
    file."""
    import train
    from data.__main__ import main as doctor
    labelme = tmp_path / "labelme"
    labelme.mkdir()
    changes = [lambda s: s.update(points=[[0, 0], ["a", 0], [4, 4]]), lambda s: s.update(shape_type="bogus"),
               lambda s: s.update(points=[[0, 0], [400, 0], [4, 4]]), lambda s: s.update(label=5),
               lambda s: s.update(label="dog"), lambda s: s.update(label=" "), lambda s: None]
    for i, change in enumerate(changes):
        random_image(8, 8, seed=i).save(labelme / f"a{i}.png")
        shape = {"label": "cat", "shape_type": "polygon", "points": [[0, 0], [4, 0], [4, 4]]}
        change(shape)
        (labelme / f"a{i}.json").write_text(json.dumps({"shapes": [shape], "imagePath": f"a{i}.png",
                                                        "imageHeight": 8, "imageWidth": 8}))
    (labelme / "labels.txt").write_text("__ignore__\n_background_\ncat\n")
    expected = [r"a0.json shape 0 \('cat'\): \"points\" must be \[x, y\] pairs of numbers",
                r"a1.json shape 0 \('cat'\): shape type 'bogus'",
                r"a2.json shape 0 \('cat'\): polygon point \(400, 0\) is outside the 8x8 image",
                r"a3.json shape 0: \"label\" must be a class name \(a non-empty string\), got 5",
                r"a4.json shape 0 \('dog'\): label 'dog' is not a class \(background, cat\)",
                r"a5.json shape 0: \"label\" must be a class name \(a non-empty string\), got ' '"]
    cvat = tmp_path / "cvat"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (cvat / sub).mkdir(parents=True)
    (cvat / "labelmap.txt").write_text("background:0,0,0::\ncat:1,2::\ndog:0,0,0::\n"
                                       + "".join(f"c{i}:{i % 256},{i // 256},7::\n" for i in range(300)))
    random_image(8, 8).save(cvat / "JPEGImages" / "a.jpg")
    Image.new("RGB", (8, 8)).save(cvat / "SegmentationClass" / "a.png")
    (cvat / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    cvat_expected = [r"labelmap.txt line 2: expected 'name:r,g,b::', got 'cat:1,2::'",
                     r"labelmap.txt line 3: 'dog' has the colour \(0, 0, 0\) of 'background'; each label needs",
                     r"labelmap.txt: 302 labels; the label maps hold 255"]
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "dataset.json").write_text(json.dumps({"classes": ["a", "a"], "bands": "x", "palette": [[1, 2, 3]],
                                                       "splits": {"train": {"images": 5, "annotations": "nope"}}}))
    manifest_expected = [r"key 'classes' names 'a' twice", r"key 'palette' has 1 colours for 2 classes",
                         r"key 'bands' must be the images' band count, 1..64, got 'x'",
                         r"key 'splits.train.images' must be a path relative to .*, got 5",
                         r"key 'splits.train.annotations' names 'nope', which does not exist"]
    for folder, messages in ((labelme, expected), (cvat, cvat_expected), (manifest, manifest_expected)):
        assert doctor([str(folder)]) == 1
        out = capsys.readouterr().out
        for message in messages:
            assert __import__("re").search(message, out), (message, out)
        assert f"{len(messages)} problem(s) found" in out
        code = train.main(["--data", str(folder), "--max-steps", "1", "--out", str(tmp_path / "run"), "--no-plots"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert f"(and {len(messages) - 1} more: python -m data doctor lists them)" in err


@pytest.mark.parametrize("labels, said", [
    ("__ignore__\n_background_\ncat\ncat\n", r"labels\.txt: the class 'cat' is named twice"),
    ("_background_\nbackground\n", r"labels\.txt: the class 'background' is named twice \(_background_ is"),
    ("".join(f"c{i}\n" for i in range(300)), r"labels\.txt: 300 classes; the label maps hold 255"),
])
def test_labels_txt_naming_a_class_twice_or_too_many_is_refused_by_name(tmp_path, labels, said):
    """A name twice in labels.txt made one of the classes vanish from label2id (its pixels trained as the
    other), and 300 names failed only when the first label map was drawn."""
    from data.labelling import labelme_classes
    (tmp_path / "labels.txt").write_text(labels)
    with pytest.raises(DataError, match=said):
        labelme_classes(tmp_path, [], None)


@pytest.mark.parametrize("count, background", [(255, True), (254, True), (300, False)])
def test_more_classes_than_the_label_maps_hold_is_refused_not_ignored(tmp_path, count, background):
    """With the background, 255 categories made the last one class 255, the ignore index: its pixels silently
    ignored; more than 256 overflowed the uint8 drawing."""
    from data.labelling import coco_problems
    document = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"c{i}"} for i in range(count)]}
    problems = coco_problems(document, tmp_path / "c.json", background=background)
    if count + background <= 255:
        assert problems == []
    else:
        assert len(problems) == 1 and f"{count} categories" in problems[0] and "the label maps hold 255" in problems[0]


@pytest.mark.parametrize("change, said", [
    (lambda d: d.update(imageHeight=200000, imageWidth=200000), r"declares 200000x200000 pixels, more than"),
    (lambda d: d.update(imageHeight="40"), r"\"imageHeight\" and \"imageWidth\" must be positive integers"),
    (lambda d: d["shapes"][0].update(points=[[4, "a"], [30, 6], [16, 30]]), r"shape 0 \('cat'\): \"points\" must be"),
    (lambda d: d["shapes"][0].update(points=[[4, 4, 4], [30, 6], [16, 30]]), r"shape 0 \('cat'\): \"points\" must be"),
])
def test_a_bad_labelme_file_is_named_before_anything_is_drawn(tmp_path, change, said):
    """A 300-byte file claiming a 200000 x 200000 image allocated 40 GB before anything else was checked;
    points that are not numbers gave a traceback."""
    from data.labelling import draw_labelme
    from segformer.errors import DataError
    shapes = [{"label": "cat", "shape_type": "polygon", "points": [[4, 4], [30, 6], [16, 30]]}]
    document = {"imagePath": "a.png", "imageData": None, "imageHeight": H, "imageWidth": W, "shapes": shapes}
    change(document)
    (tmp_path / "a.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"a.json.*" + said):
        draw_labelme(tmp_path / "a.json", ("background", "cat"))


def test_files_named_from_outside_the_data_folder_are_refused_unless_allowed(tmp_path, capsys):
    """A COCO file_name with `../..` or an absolute path, a LabelMe imagePath likewise: read and trained on
    with no word before. Now train.py refuses in one line naming the file and what names it, the doctor lists
    each as a problem, and --allow-outside-data reads them."""
    import train
    from data.__main__ import main as doctor
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(2):
        random_image(H, W, seed=i).save(elsewhere / f"secret{i}.png")
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "annotations").mkdir()
    random_image(H, W, seed=3).save(coco / "images" / "own.png")
    names = ["own.png", "../../elsewhere/secret0.png", str(elsewhere / "secret1.png")]
    (coco / "annotations" / "instances_train.json").write_text(json.dumps(coco_json(names, SHAPES)))
    labelme = tmp_path / "labelme"
    labelme.mkdir()
    random_image(H, W, seed=4).save(labelme / "own.png")
    for name, image in (("own", "own.png"), ("away", str(elsewhere / "secret0.png"))):
        document = {"imagePath": image, "imageData": None, "imageHeight": H, "imageWidth": W,
                    "shapes": [{"label": "cat", "shape_type": "polygon", "points": [[4, 4], [30, 6], [16, 30]]}]}
        (labelme / f"{name}.json").write_text(json.dumps(document))
    for folder, count, named in ((coco, 2, "instances_train.json image id 2 (../../elsewhere/secret0.png)"),
                                 (labelme, 1, "away.json")):
        code = train.main(["--data", str(folder), "--max-steps", "1", "--out", str(tmp_path / "run"), "--no-plots",
                           "--size", "32"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"{count} file(s) named by the data lie outside the folder" in err and named in err, err
        assert "secret0.png" in err and "--allow-outside-data" in err
        assert doctor([str(folder)]) == 1
        out = capsys.readouterr().out
        assert out.count("outside the folder (left out; --allow-outside-data reads it)") == count
        assert f"{count} problem(s) found" in out
    assert train.main(["--data", str(coco), "--max-steps", "1", "--out", str(tmp_path / "allowed"), "--no-plots",
                       "--size", "32", "--batch-size", "2", "--allow-outside-data"]) == 0
    assert "2 training / 1 validation samples" in capsys.readouterr().out


def test_names_the_system_cannot_look_up_are_files_missing_not_tracebacks(tmp_path, capsys):
    """A COCO file_name or LabelMe imagePath of 5,000 characters (or with a NUL byte), and a dataset.json folder
    of that length: Path.is_file raised OSError (File name too long) out of the reader."""
    from data.__main__ import main as doctor
    long_name, nul_name = "x" * 5000 + ".png", "a\0.png"
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "annotations").mkdir()
    random_image(H, W).save(coco / "images" / "img0.png")
    document = coco_json(["img0.png", long_name, nul_name], SHAPES)
    (coco / "annotations" / "instances_train.json").write_text(json.dumps(document))
    assert doctor([str(coco)]) == 1
    out = capsys.readouterr().out
    assert out.count("unpaired: ") == 2 and "image id 2, xxxx" in out and "2 problem(s) found" in out
    labelme = tmp_path / "labelme"
    labelme.mkdir()
    for i, name in enumerate((long_name, nul_name)):
        (labelme / f"a{i}.json").write_text(json.dumps({"shapes": [], "imagePath": name, "imageHeight": H,
                                                        "imageWidth": W}))
    assert doctor([str(labelme)]) == 1
    assert "its image 'xxxx" in capsys.readouterr().out
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "dataset.json").write_text(json.dumps({"classes": ["a"], "splits": {"train": {
        "images": "x" * 5000, "annotations": "b"}}}))
    assert doctor([str(manifest)]) == 1
    assert "key 'splits.train.images' names 'xxxx" in capsys.readouterr().out
