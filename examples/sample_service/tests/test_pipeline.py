"""Unit tests of the sample service (stdlib unittest).

Run from the service directory:  python -m unittest discover -s tests
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ingestion_pipeline as ip  # noqa: E402
import schema_validator  # noqa: E402
import service  # noqa: E402
import verification  # noqa: E402


def valid_record():
    return {
        "id": 7,
        "file_path": "book_7.pdf",
        "title": "Book 7",
        "page_count": 120,
        "ingested_at": "2026-01-02T03:04:05+00:00",
        "checksum": "0123456789abcdef",
    }


class ChunkCountingTest(unittest.TestCase):
    def test_exact_and_partial_chunks(self):
        self.assertEqual(ip.count_chunks(ip.MB, 64 * ip.KB), 16)
        self.assertEqual(ip.count_chunks(ip.MB + 1, ip.MB), 2)
        self.assertEqual(ip.count_chunks(1, ip.MB), 1)
        self.assertEqual(ip.count_chunks(0, ip.MB), 0)

    def test_invalid_arguments(self):
        with self.assertRaises(ValueError):
            ip.count_chunks(ip.MB, 0)
        with self.assertRaises(ValueError):
            ip.count_chunks(-1, ip.MB)

    def test_chunks_cover_the_whole_file(self):
        for size in (1, 10 * ip.KB, ip.MB, 50 * ip.MB):
            chunk = ip.chunk_size_for(size)
            self.assertGreater(chunk, 0)
            self.assertGreaterEqual(ip.count_chunks(size, chunk) * chunk, size)

    def test_run_processes_every_chunk(self):
        result = ip.run_pipeline("small.pdf", 3 * ip.MB, ip.DEFAULT_TIMEOUT_SECONDS)
        self.assertTrue(result.ok)
        self.assertEqual(result.chunks_processed, result.chunks)
        self.assertEqual(result.chunks, ip.count_chunks(3 * ip.MB, result.chunk_size_bytes))


class ModeledTimeTest(unittest.TestCase):
    def test_small_files_are_fast(self):
        for size_mb, limit in ((1, 5), (50, 60)):
            result = ip.run_pipeline(f"file_{size_mb}mb.pdf", size_mb * ip.MB, ip.DEFAULT_TIMEOUT_SECONDS)
            self.assertTrue(result.ok, result)
            self.assertLess(result.modeled_seconds, limit)
            self.assertAlmostEqual(result.elapsed_seconds, result.modeled_seconds, places=2)

    def test_modeled_time_grows_with_size(self):
        chunk = 64 * ip.KB
        self.assertLess(ip.modeled_seconds(10 * ip.MB, chunk), ip.modeled_seconds(20 * ip.MB, chunk))

    def test_fewer_chunks_cost_less(self):
        size = 100 * ip.MB
        self.assertLess(ip.modeled_seconds(size, ip.MB), ip.modeled_seconds(size, 64 * ip.KB))

    def test_run_is_deterministic(self):
        a = ip.run_pipeline("same.pdf", 5 * ip.MB, 300)
        b = ip.run_pipeline("same.pdf", 5 * ip.MB, 300)
        self.assertEqual(a, b)


class TimeoutHandlingTest(unittest.TestCase):
    def test_run_stops_at_the_timeout(self):
        result = ip.run_pipeline("report_50mb.pdf", 50 * ip.MB, 1)
        self.assertFalse(result.ok)
        self.assertLessEqual(result.elapsed_seconds, 1)
        self.assertLess(result.chunks_processed, result.chunks)
        self.assertEqual(result.timeout_seconds, 1)

    def test_timeout_must_be_positive(self):
        with self.assertRaises(ValueError):
            ip.run_pipeline("x.pdf", ip.MB, 0)

    def test_config_timeout_validation(self):
        self.assertEqual(service.validate_positive_int(300, "pipeline_timeout_seconds", 86400), 300)
        for bad in (0, -5, "300", 2.5, True, None, 10**9):
            with self.assertRaises(service.ApiError) as ctx:
                service.validate_positive_int(bad, "pipeline_timeout_seconds", 86400)
            self.assertEqual(ctx.exception.status, 400)
            self.assertEqual(ctx.exception.payload()["field"], "pipeline_timeout_seconds")


class SchemaValidationTest(unittest.TestCase):
    def test_expected_schema_is_valid(self):
        self.assertEqual(schema_validator.validate_schema(schema_validator.expected_schema()), [])

    def test_corrupted_schema_is_reported(self):
        schema = schema_validator.expected_schema()
        del schema["columns"]["checksum"]
        schema["columns"]["page_count"]["type"] = "text"
        problems = schema_validator.schema_problems(schema)
        self.assertEqual({(p["column"], p["problem"]) for p in problems},
                         {("checksum", "missing"), ("page_count", "wrong_type")})

    def test_valid_record_passes(self):
        self.assertEqual(schema_validator.validate_record(valid_record(), schema_validator.EXPECTED_SCHEMA), [])

    def test_missing_required_column(self):
        record = valid_record()
        del record["title"]
        problems = schema_validator.validate_record(record, schema_validator.EXPECTED_SCHEMA)
        self.assertEqual(problems, ["title: required column missing"])

    def test_wrong_type_and_unknown_column(self):
        record = valid_record()
        record["page_count"] = "4l2"
        record["colour"] = "blue"
        problems = schema_validator.validate_record(record, schema_validator.EXPECTED_SCHEMA)
        self.assertEqual(len(problems), 2)
        self.assertTrue(problems[0].startswith("page_count: expected integer"))
        self.assertEqual(problems[1], "colour: column not in schema")

    def test_bad_timestamp_rejected(self):
        record = valid_record()
        record["ingested_at"] = "yesterday"
        self.assertEqual(len(schema_validator.validate_record(record, schema_validator.EXPECTED_SCHEMA)), 1)


class VerificationTest(unittest.TestCase):
    def doc(self, content="Some text", pages=3):
        return {"id": "doc-x", "content": content, "page_count": pages,
                "checksum": verification.content_checksum(content)}

    def test_intact_document_verifies(self):
        self.assertEqual(verification.verify_document(self.doc()), [])

    def test_checksum_mismatch_detected(self):
        doc = self.doc()
        doc["content"] = "Some te"
        self.assertEqual(verification.verify_document(doc), ["checksum mismatch"])


if __name__ == "__main__":
    unittest.main()
