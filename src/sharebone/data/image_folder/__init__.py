"""Any folder of images as a few-shot task family, and the natural-image benchmarks.

Layout (hidden entries such as ``.ipynb_checkpoints/`` are not data)::

    root/<class>/*.{png,jpg,jpeg,bmp,webp,gif}            a folder per class, or
    root/<group>/<class>/*.jpg                             grouped one level above

A group (an alphabet, a tieredImageNet category, a bird family) is what ``group_episodes``
draws episodes within. Splits (``splits.<split>``), in one of three forms:

- **class lists**: a text file (or a YAML list), one class per line, ``<class>`` or
  ``<group>/<class>`` (the group then comes from the line); lines starting with ``#`` are
  comments. A class is found by its folder's path under ``root`` or by its folder's own name.
- **CSV** ``filename,label`` (the Ravi & Larochelle miniImageNet files): each file is looked
  up as ``root/images/<filename>``, ``root/<label>/<filename>`` or ``root/<filename>``.
- **a fraction**: a seeded random split (``split_seed``) of the classes no list names.

A relative split file is looked up under ``root``, then in sharebone's ``tasks/`` folder (where
``tasks/splits/<benchmark>/`` ships the published splits).

``source`` says where the pixels come from: ``folder`` (the above), ``mini_imagenet_pickle``
(``root/mini-imagenet-cache-<split>.pkl``, dicts of ``image_data`` [N, 84, 84, 3] uint8 and
``class_dict`` name -> indices), ``tiered_imagenet_pickle`` (Ren et al.'s release,
``root/<split>_images_png.pkl`` and ``root/<split>_labels.pkl``:
:mod:`sharebone.data.image_folder.tiered_release`; its 34 categories are the groups), ``cifar100``
(``root/cifar-100-python.tar.gz``, downloaded and md5-checked when missing; CIFAR-FS and FC100
take their classes from both of its batches), Meta-Dataset's releases in their own layouts
(``aircraft``, ``vgg_flower``, ``fungi``, ``quickdraw``, ``traffic_sign``, ``mscoco``:
:mod:`sharebone.data.image_folder.md_releases`), or ``auto`` (the miniImageNet pickles when
present, else the tieredImageNet release, else Ravi's ``<split>.csv`` files, else a folder).
Pickles are read with a restricted unpickler (numpy arrays, dicts, lists and str only) and tar
members in memory, never extracted.

Each split is decoded once, in parallel (``workers`` threads; Pillow decodes and resizes
without the GIL), into a uint8 ``[N, C, S, S]`` ``.npy`` cache under
``<cache_dir>/image_folder/``, written atomically and opened memory-mapped: the images are read
from the page cache as episodes need them, shared by every process that samples from them, and
never held in memory twice. The cache's name carries a hash of everything that changes its
contents (the files with their sizes and mtimes, image size, channels, resizing, the format
version); its header and a JSON sidecar are checked on every read, and a file that does not
match is rebuilt, never trusted.

The package, by concern: :mod:`~sharebone.data.image_folder.family` (the family,
:class:`ImageFolderTasks`), :mod:`~sharebone.data.image_folder.sources` (the sources above),
:mod:`~sharebone.data.image_folder.splits` (split specs, their disjointness),
:mod:`~sharebone.data.image_folder.classes` (class folders, their images and groups),
:mod:`~sharebone.data.image_folder.cache` (the memory-mapped cache and its record),
:mod:`~sharebone.data.image_folder.tiered_release` (tieredImageNet's pickles) and
:mod:`~sharebone.data.image_folder.md_releases` (Meta-Dataset's releases).
"""

from sharebone.data.image_folder.family import ImageFolderTasks

__all__ = ["ImageFolderTasks"]
