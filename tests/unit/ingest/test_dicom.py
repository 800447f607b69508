"""DICOM ingest on real pixel data: every codec family against pydicom's own pixel_array, LUTs, limits, refusals.

The sample files are those shipped inside the installed pydicom package (read from disk; nothing is downloaded).
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid

from service.inference.manifest import ImagePreprocessing
from service.inference.preprocess import window_image
from service.ingest import dicom
from tests.factories import dx_instance

SAMPLES = Path(pydicom.data.__file__).parent / "test_files"
MAX_PIXELS = 16384 * 16384
MONO2_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sample(name: str, **changes: object) -> bytes:
    """A shipped sample as Part 10 bytes, with identifying UIDs added where the sample lacks them."""
    ds = pydicom.dcmread(SAMPLES / name)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _bytes(ds)


def _reference(data: bytes) -> np.ndarray:
    """pydicom's own pixel_array with the same plugin, of the frame decode_frame decodes by default."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.pixel_array_options(decoding_plugin=dicom.decoding_plugin_for(ds.file_meta.TransferSyntaxUID))
    array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    return array[frames // 2] if frames > 1 else array


CODECS = [
    ("SC_rgb_jpeg_dcmtk.dcm", pydicom.uid.JPEGBaseline8Bit),
    ("examples_ybr_color.dcm", pydicom.uid.JPEGBaseline8Bit),  # 30 frames, YBR_FULL_422
    ("JPGExtended.dcm", pydicom.uid.JPEGExtended12Bit),
    ("SC_rgb_jpeg_gdcm.dcm", pydicom.uid.JPEGLosslessSV1),
    ("MR_small_jpeg_ls_lossless.dcm", pydicom.uid.JPEGLSLossless),
    ("JPEGLSNearLossless_16.dcm", pydicom.uid.JPEGLSNearLossless),
    ("SC_rgb_jls_lossy_sample.dcm", pydicom.uid.JPEGLSNearLossless),
    ("MR_small_jp2klossless.dcm", pydicom.uid.JPEG2000Lossless),
    ("693_J2KI.dcm", pydicom.uid.JPEG2000),
    ("GDCMJ2K_TextGBR.dcm", pydicom.uid.JPEG2000Lossless),  # YBR_RCT
    ("MR_small_RLE.dcm", pydicom.uid.RLELossless),
    ("rtdose_rle.dcm", pydicom.uid.RLELossless),  # 15 frames, 32 bits
    ("SC_rgb_rle_32bit_2frame.dcm", pydicom.uid.RLELossless),
    ("image_dfl.dcm", pydicom.uid.DeflatedExplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", pydicom.uid.ExplicitVRBigEndian),
    ("rtdose_expb.dcm", pydicom.uid.ExplicitVRBigEndian),  # 15 frames
    ("liver_1frame.dcm", pydicom.uid.ExplicitVRLittleEndian),  # 1 bit allocated
    ("SC_ybr_full_422_uncompressed.dcm", pydicom.uid.ExplicitVRLittleEndian),
]


@pytest.mark.parametrize(("name", "transfer_syntax"), CODECS, ids=[name for name, _ in CODECS])
def test_each_codec_decodes_to_pydicoms_own_pixels(name: str, transfer_syntax: UID) -> None:
    data = _sample(name)
    meta = dicom.parse_instance(data, max_pixels=MAX_PIXELS).meta
    assert meta.transfer_syntax_uid == transfer_syntax
    expected_plugin = "pylibjpeg" if transfer_syntax.is_compressed else ""
    assert dicom.decoding_plugin_for(transfer_syntax) == expected_plugin
    decoded = dicom.decode_frame(data, max_pixels=MAX_PIXELS)
    reference = _reference(data)
    assert decoded.dtype.isnative
    assert decoded.shape == reference.shape
    assert np.array_equal(decoded, reference)


def test_jpeg_lossless_process_14_decodes() -> None:
    # a selection-value-1 codestream is a valid Process 14 codestream: the same data under the .57 transfer syntax
    ds = pydicom.dcmread(SAMPLES / "SC_rgb_jpeg_gdcm.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLossless
    data = _bytes(ds)
    assert np.array_equal(dicom.decode_frame(data, max_pixels=MAX_PIXELS), _reference(data))


def test_multi_frame_decodes_the_asked_frame_only() -> None:
    data = _sample("rtdose_rle.dcm")
    volume = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert volume.shape[0] == 15
    for index in (0, 7, 14):
        assert np.array_equal(dicom.decode_frame(data, max_pixels=MAX_PIXELS, index=index), volume[index])
    with pytest.raises(dicom.DicomRejected) as refused:
        dicom.decode_frame(data, max_pixels=MAX_PIXELS, index=15)
    assert refused.value.failure_reason == dicom.FAILURE_DOES_NOT_MATCH


def test_big_endian_image_equals_its_little_endian_twin() -> None:
    little = dicom.decode_image(_sample("MR_small.dcm"), max_pixels=MAX_PIXELS)
    big = dicom.decode_image(_sample("MR_small_bigendian.dcm"), max_pixels=MAX_PIXELS)
    assert np.array_equal(little.pixels, big.pixels)
    assert little.window == big.window == (600.0, 1600.0)


def test_rescale_slope_and_intercept_give_modality_units() -> None:
    data = _sample("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    decoded = dicom.decode_image(data, max_pixels=MAX_PIXELS)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert decoded.pixels.dtype == np.float32
    assert np.array_equal(decoded.pixels, expected.astype(np.float32))
    assert decoded.voi_lut_applied is False


@pytest.mark.parametrize("changes", [{"RescaleSlope": "NaN"}, {"RescaleIntercept": "inf"}], ids=["slope", "intercept"])
def test_a_rescale_that_is_not_a_finite_number_is_refused(changes: dict[str, str]) -> None:
    """Before, it made every pixel NaN, and the job then failed storing a NaN probability ("internal error")."""
    with pytest.raises(dicom.DicomRejected, match="must be finite numbers"):
        dicom.decode_image(_sample("CT_small.dcm", **changes), max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("changes", [{"WindowCenter": "NaN"}, {"WindowWidth": "inf"}], ids=["center", "width"])
def test_a_window_that_is_not_a_finite_number_is_ignored(changes: dict[str, str]) -> None:
    data = _sample("CT_small.dcm", **{"WindowCenter": "40", "WindowWidth": "400", **changes})
    assert dicom.decode_image(data, max_pixels=MAX_PIXELS).window is None


def test_a_fractional_slope_and_intercept_match_pydicoms_modality_lut() -> None:
    data = _sample("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.RescaleSlope, ds.RescaleIntercept = "0.37", "-1024.5"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    decoded = dicom.decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS)
    expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)  # float64
    assert decoded.pixels.dtype == np.float32
    np.testing.assert_allclose(decoded.pixels, expected, rtol=1e-6, atol=1e-3)


def _lut_item(descriptor: list[int], values: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)
    item.add_new("LUTData", "US", [int(v) for v in values])
    return item


def test_modality_lut_sequence_replaces_rescale() -> None:
    ds = pydicom.dcmread(SAMPLES / "MR_small.dcm")
    raw = ds.pixel_array
    lut = (np.arange(4096) * 3 + 7) % 65536
    item = _lut_item([4096, 0, 16], lut)
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    decoded = dicom.decode_image(_bytes(ds), max_pixels=MAX_PIXELS)
    assert np.array_equal(decoded.pixels, lut[np.clip(raw, 0, 4095)].astype(np.float32))


def test_voi_lut_sequence_is_applied_when_there_is_no_window() -> None:
    ds = pydicom.dcmread(SAMPLES / "MR_small.dcm")
    raw = ds.pixel_array.astype(np.int64)
    first = 100
    lut = np.clip((np.arange(2048) ** 0.5) * 5.6, 0, 255).astype(np.int64)  # a non-linear display curve
    ds.VOILUTSequence = [_lut_item([2048, first, 8], lut)]
    del ds.WindowCenter, ds.WindowWidth
    decoded = dicom.decode_image(_bytes(ds), max_pixels=MAX_PIXELS)
    expected = lut[np.clip(raw - first, 0, 2047)].astype(np.float32)
    assert decoded.voi_lut_applied is True
    assert np.array_equal(decoded.pixels, expected)
    assert decoded.window == (127.5, 255.0)
    windowed = window_image(
        decoded.pixels,
        photometric_interpretation=decoded.photometric_interpretation,
        window=decoded.window,
        spec=ImagePreprocessing(resize=(64, 64)),
    )
    assert np.allclose(windowed, expected / 255.0)


def test_window_attributes_win_over_a_voi_lut_sequence() -> None:
    ds = pydicom.dcmread(SAMPLES / "MR_small.dcm")
    ds.VOILUTSequence = [_lut_item([256, 0, 8], np.arange(256))]
    decoded = dicom.decode_image(_bytes(ds), max_pixels=MAX_PIXELS)
    assert decoded.voi_lut_applied is False
    assert decoded.window == (600.0, 1600.0)
    assert decoded.pixels.max() > 255


def _enhanced_multi_frame(slopes: list[float]) -> bytes:
    """A native multi-frame object whose rescale and window live in per-frame functional groups."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MONO2_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MONO2_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 5, len(slopes)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    frames = np.stack([np.full((4, 5), 10 * (i + 1), dtype=np.uint16) for i in range(len(slopes))])
    ds.PixelData = frames.tobytes()
    shared = Dataset()
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 40, 400
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for slope in slopes:
        group, transform = Dataset(), Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, -5, "US"
        group.PixelValueTransformationSequence = [transform]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return _bytes(ds)


def test_enhanced_multi_frame_uses_the_middle_frames_own_rescale() -> None:
    decoded = dicom.decode_image(_enhanced_multi_frame([1.0, 2.0, 3.0, 4.0, 5.0]), max_pixels=MAX_PIXELS)
    # the middle frame (index 2) holds 30 everywhere, with slope 3 and intercept -5
    assert np.array_equal(decoded.pixels, np.full((4, 5), 85.0, dtype=np.float32))
    assert decoded.window == (40.0, 400.0)


def test_monochrome1_is_kept_for_windowing_to_invert() -> None:
    decoded = dicom.decode_image(_sample("dicomdirtests/77654033/CR1/6154"), max_pixels=MAX_PIXELS)
    assert decoded.photometric_interpretation == "MONOCHROME1"


def test_colour_is_stored_but_not_decoded_as_an_image() -> None:
    data = _sample("SC_rgb_jpeg_dcmtk.dcm")
    assert dicom.parse_instance(data, max_pixels=MAX_PIXELS).meta.photometric_interpretation == "YBR_FULL"
    with pytest.raises(dicom.DicomRejected) as refused:
        dicom.decode_image(data, max_pixels=MAX_PIXELS)
    assert refused.value.failure_reason == dicom.FAILURE_DOES_NOT_MATCH


def _header_only(rows: int, columns: int, frames: int, *, samples: int = 1, bits: int = 16) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MONO2_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MONO2_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = b"\0" * 16
    return _bytes(ds)


def _refused(data: bytes, *, max_pixels: int = MAX_PIXELS) -> dicom.DicomRejected:
    with pytest.raises(dicom.DicomRejected) as refused:
        dicom.parse_instance(data, max_pixels=max_pixels)
    return refused.value


def test_a_huge_header_over_small_pixel_data_is_refused_before_allocation() -> None:
    data = _header_only(65535, 65535, 10000)
    tracemalloc.start()
    try:
        for decode in (dicom.parse_instance, dicom.decode_frame, dicom.decode_image):
            with pytest.raises(dicom.DicomRejected) as refused:
                decode(data, max_pixels=MAX_PIXELS)
            assert refused.value.failure_reason == dicom.FAILURE_OUT_OF_RESOURCES
            assert "65535x65535x10000" in refused.value.message
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024**2


def test_decoded_bytes_are_bounded_as_well_as_pixels() -> None:
    # 1000 pixels fit the pixel limit, but 3 samples of 32 bits make 12000 bytes, beyond 4 bytes per pixel
    refused = _refused(_header_only(10, 100, 1, samples=3, bits=32), max_pixels=1000)
    assert refused.failure_reason == dicom.FAILURE_OUT_OF_RESOURCES
    assert "12000 bytes" in refused.message
    assert dicom.decoded_bytes_limit(1000) == 4000


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"BitsAllocated": 12}, "BitsAllocated 12"),
        ({"SamplesPerPixel": 2}, "SamplesPerPixel 2"),
        ({"Rows": 0}, "Rows 0"),
        ({"NumberOfFrames": "-3"}, "NumberOfFrames"),
    ],
)
def test_an_implausible_image_pixel_module_is_refused(changes: dict[str, object], words: str) -> None:
    refused = _refused(_sample("MR_small.dcm", **changes))
    assert refused.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND
    assert words in refused.message


def test_pixel_data_without_rows_is_refused() -> None:
    refused = _refused(_sample("MR_small.dcm", Rows=None))
    assert refused.failure_reason == dicom.FAILURE_DOES_NOT_MATCH
    assert "Rows" in refused.message


def test_a_truncated_native_object_is_refused() -> None:
    refused = _refused((SAMPLES / "MR_truncated.dcm").read_bytes())
    assert refused.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND
    assert "truncated" in refused.message


def _deflated_bomb(inflated_bytes: int) -> bytes:
    """A Part 10 object in the deflated transfer syntax whose PixelData inflates to ``inflated_bytes`` zeros."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MONO2_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [buffer.getvalue()]
    # (7FE0,0010) OB, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length
    out.append(compressor.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)))
    zeros = b"\0" * 1024**2
    for _ in range(inflated_bytes // len(zeros)):
        out.append(compressor.compress(zeros))
    out.append(compressor.flush())
    return b"".join(out)


def test_a_deflate_bomb_is_refused_before_it_is_inflated() -> None:
    data = _deflated_bomb(96 * 1024**2)
    assert len(data) < 1024**2
    tracemalloc.start()
    try:
        refused = _refused(data, max_pixels=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.failure_reason == dicom.FAILURE_OUT_OF_RESOURCES
    assert "inflates beyond" in refused.message
    assert peak < 16 * 1024**2


def test_a_corrupt_deflate_stream_is_refused() -> None:
    data = bytearray((SAMPLES / "image_dfl.dcm").read_bytes())
    data[400:440] = b"\xff" * 40
    refused = _refused(bytes(data))
    assert refused.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND


def _reencapsulated(name: str, fragments: list[bytes], **changes: object) -> bytes:
    ds = pydicom.dcmread(SAMPLES / name)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.PixelData = b"".join(fragments)
    ds["PixelData"].is_undefined_length = True
    return _bytes(ds)


def _item(value: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(value)) + value


def test_fewer_fragments_than_frames_is_refused() -> None:
    frame = pydicom.encaps.get_frame(pydicom.dcmread(SAMPLES / "MR_small_RLE.dcm").PixelData, 0)
    data = _reencapsulated("MR_small_RLE.dcm", [_item(b""), _item(frame)], NumberOfFrames=3)
    refused = _refused(data)
    assert refused.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND
    assert "1 fragments for 3 frames" in refused.message


def test_a_basic_offset_table_of_the_wrong_size_is_refused() -> None:
    frame = pydicom.encaps.get_frame(pydicom.dcmread(SAMPLES / "MR_small_RLE.dcm").PixelData, 0)
    table = struct.pack("<3L", 0, 8, 16)
    data = _reencapsulated("MR_small_RLE.dcm", [_item(table), _item(frame), _item(frame)], NumberOfFrames=2)
    refused = _refused(data)
    assert refused.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND
    assert "Basic Offset Table" in refused.message


def test_a_fragment_running_past_the_data_is_refused() -> None:
    frame = pydicom.encaps.get_frame(pydicom.dcmread(SAMPLES / "MR_small_RLE.dcm").PixelData, 0)
    broken = struct.pack("<HHL", 0xFFFE, 0xE000, len(frame) + 1000) + frame
    refused = _refused(_reencapsulated("MR_small_RLE.dcm", [_item(b""), broken]))
    assert refused.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND
    assert "malformed" in refused.message


def test_a_codestream_larger_than_its_header_is_refused_before_decoding() -> None:
    # the JPEG 2000 codestream says 64x64; a header claiming 16x16 would make the decoder allocate beyond it
    data = _sample("MR_small_jp2klossless.dcm", Rows=16, Columns=16)
    dicom.parse_instance(data, max_pixels=MAX_PIXELS)
    with pytest.raises(dicom.DicomRejected) as refused:
        dicom.decode_frame(data, max_pixels=MAX_PIXELS)
    assert refused.value.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND
    assert "declares 64x64" in refused.value.message


def test_a_jpeg_frame_without_a_frame_header_is_refused() -> None:
    data = _reencapsulated("SC_rgb_jpeg_dcmtk.dcm", [_item(b""), _item(b"\xff\xd8\xff\xda\x00\x02\xff\xd9")])
    with pytest.raises(dicom.DicomRejected) as refused:
        dicom.decode_frame(data, max_pixels=MAX_PIXELS)
    assert refused.value.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND


def test_data_the_decoder_cannot_read_is_refused_with_cannot_understand() -> None:
    # a 12-bit JPEG that libjpeg refuses: pydicom's own pixel_array fails on it as well
    data = (SAMPLES / "JPEG-lossy.dcm").read_bytes()
    dicom.parse_instance(data, max_pixels=MAX_PIXELS)
    with pytest.raises(dicom.DicomRejected) as refused:
        dicom.decode_image(data, max_pixels=MAX_PIXELS)
    assert refused.value.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND


@pytest.mark.parametrize(
    "transfer_syntax",
    [pydicom.uid.MPEG2MPML, pydicom.uid.HEVCMP51, pydicom.uid.JPEG2000MCLossless, UID("1.2.826.0.1.3680043.9.9999.1")],
)
def test_pixel_data_no_installed_decoder_handles_is_refused_at_parse(transfer_syntax: UID) -> None:
    ds = pydicom.dcmread(SAMPLES / "CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].is_undefined_length = True
    refused = _refused(_bytes(ds))
    assert refused.failure_reason == dicom.FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED == 0xC122
    assert transfer_syntax in refused.message
    assert refused.sop_instance_uid == ds.SOPInstanceUID


def test_objects_without_pixel_data_are_stored_whatever_their_transfer_syntax() -> None:
    ds = pydicom.dcmread(SAMPLES / "test-SR.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta = dicom.parse_instance(_bytes(ds), max_pixels=MAX_PIXELS).meta
    assert meta.sop_class_uid == ds.SOPClassUID
    with pytest.raises(dicom.DicomRejected) as refused:
        dicom.decode_frame(_bytes(ds), max_pixels=MAX_PIXELS)
    assert refused.value.failure_reason == dicom.FAILURE_DOES_NOT_MATCH


def test_voi_lut_data_in_ow_follows_the_transfer_syntaxs_byte_order() -> None:
    ds = pydicom.dcmread(SAMPLES / "MR_small_bigendian.dcm")
    raw = ds.pixel_array.astype(np.int64)
    lut = (np.arange(4096) * 16 + 3).astype(">u2")  # 16-bit entries, stored big endian
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "OW", lut.tobytes())
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    decoded = dicom.decode_image(_bytes(ds), max_pixels=MAX_PIXELS)
    assert decoded.voi_lut_applied and decoded.window == (65535 / 2, 65535.0)
    assert np.array_equal(decoded.pixels, lut[np.clip(raw, 0, 4095)].astype(np.float32))


def _extended_offsets(name: str) -> tuple[Dataset, list[bytes]]:
    ds = pydicom.dcmread(SAMPLES / name)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = pydicom.encaps.encapsulate_extended(frames)
    ds["PixelData"].is_undefined_length = True
    return ds, frames


def test_an_extended_offset_table_is_followed() -> None:
    ds, _ = _extended_offsets("rtdose_rle.dcm")
    data = _bytes(ds)
    reference = pydicom.dcmread(SAMPLES / "rtdose_rle.dcm").pixel_array
    assert np.array_equal(dicom.decode_frame(data, max_pixels=MAX_PIXELS, index=11), reference[11])


def test_an_extended_offset_table_without_its_lengths_is_refused() -> None:
    ds, _ = _extended_offsets("rtdose_rle.dcm")
    ds.ExtendedOffsetTableLengths = ds.ExtendedOffsetTableLengths[:-8]
    refused = _refused(_bytes(ds))
    assert refused.failure_reason == dicom.FAILURE_CANNOT_UNDERSTAND
    assert "Extended Offset Table Lengths" in refused.message


def test_series_and_instance_numbers_beyond_their_range_are_left_out() -> None:
    """An IS value is a 32-bit integer. Before, a larger one (99999999999) failed the object's INSERT: the object
    was refused as a processing failure (0x0110), with a traceback in the log."""
    data = _sample("CT_small.dcm", SeriesNumber="99999999999", InstanceNumber="-99999999999")
    meta = dicom.parse_instance(data, max_pixels=MAX_PIXELS).meta
    assert (meta.series_number, meta.instance_number) == (None, None)
    assert (
        dicom.parse_instance(_sample("CT_small.dcm", InstanceNumber="7"), max_pixels=MAX_PIXELS).meta.instance_number
        == 7
    )


def test_several_values_where_the_standard_has_one_are_kept_as_dicom_writes_them_and_any_may_route() -> None:
    """Found in review: BodyPartExamined ['CHEST', 'THORAX'] became the text "['CHEST', 'THORAX']", which no rule
    could match and which was shown as it was. It is kept as DICOM writes it, and a rule listing any value takes it."""
    from service.routing.rules import _text_condition

    ds = pydicom.dcmread(io.BytesIO(dx_instance()))
    ds.BodyPartExamined = ["chest", "THORAX"]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    parsed = dicom.parse_instance(buffer.getvalue(), max_pixels=4096 * 4096)
    assert parsed.meta.body_part_examined == "CHEST\\THORAX"
    assert _text_condition("BodyPartExamined", ["CHEST"], parsed.meta.body_part_examined).ok
    assert not _text_condition("BodyPartExamined", ["ABDOMEN"], parsed.meta.body_part_examined).ok
