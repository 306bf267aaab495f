"""Unit tests of the importer (stdlib unittest). Run from the service directory:

python3 -m unittest discover -s tests
"""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importer
import parsing

HEADER = "month,payee,amount,currency\n"


class AmountTest(unittest.TestCase):
    def test_plain_and_grouped_amounts_become_cents(self):
        self.assertEqual(parsing.parse_amount("950.00", "x"), 95000)
        self.assertEqual(parsing.parse_amount("1,200.50", "x"), 120050)
        self.assertEqual(parsing.parse_amount("-12.5", "x"), -1250)
        self.assertEqual(parsing.parse_amount(" 7 ", "x"), 700)

    def test_a_bad_amount_names_where_it_is(self):
        with self.assertRaisesRegex(ValueError, r"^f\.csv, line 2: amount '12\.345' is not a number$"):
            parsing.parse_amount("12.345", "f.csv, line 2")
        with self.assertRaises(ValueError):
            parsing.parse_amount("twelve", "x")


class RowsTest(unittest.TestCase):
    def test_plain_rows(self):
        rows = parsing.parse_rows("u.csv", HEADER + "2026-11,Water,42.10,EUR\n\n2026-11,Power,73.95,EUR\n")
        self.assertEqual([(r.line, r.payee, r.amount_cents) for r in rows], [(2, "Water", 4210), (4, "Power", 7395)])

    def test_the_header_is_checked(self):
        with self.assertRaisesRegex(ValueError, "line 1: the header must be"):
            parsing.parse_rows("u.csv", "when,who,how much\n2026-11,Water,1,EUR\n")

    def test_bad_fields_name_the_line(self):
        with self.assertRaisesRegex(ValueError, "u.csv, line 2: month '11/2026'"):
            parsing.parse_rows("u.csv", HEADER + "11/2026,Water,42.10,EUR\n")
        with self.assertRaisesRegex(ValueError, "u.csv, line 2: currency 'euro'"):
            parsing.parse_rows("u.csv", HEADER + "2026-11,Water,42.10,euro\n")
        with self.assertRaisesRegex(ValueError, "u.csv, line 2: expected 4 fields"):
            parsing.parse_rows("u.csv", HEADER + "2026-11,Water\n")


class ImportTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.inbox = os.path.join(self.dir.name, "inbox")
        os.mkdir(self.inbox)
        with open(os.path.join(self.inbox, "u.csv"), "w", encoding="utf-8") as fh:
            fh.write(HEADER + "2026-11,Water,42.10,EUR\n")
        self.importer = importer.Importer(self.dir.name, self.inbox, cache_limit=1024)
        self.addCleanup(self.importer.db.drop)

    def test_an_import_stores_its_rows_once(self):
        for _ in range(2):
            status, answer = self.importer.run("u.csv")
            self.assertEqual((status, answer["ok"], answer["rows"]), (200, True, 1))
        self.assertEqual(self.importer.db.stored(), {"u.csv": 1})

    def test_a_lost_connection_fails_the_import_until_reopened(self):
        self.importer.db.drop()
        status, answer = self.importer.run("u.csv")
        self.assertEqual((status, answer["error"]), (503, "database connection lost"))
        self.assertEqual(self.importer.attempts.last_failed(), "u.csv")
        self.importer.db.reopen()
        self.assertEqual(self.importer.run("u.csv")[0], 200)
        self.assertIsNone(self.importer.attempts.last_failed())

    def test_the_cache_reports_its_bytes_and_flushes(self):
        self.importer.cache.put("x", b"\0" * 2048)
        self.assertGreater(self.importer.cache.bytes(), self.importer.cache.limit)
        self.assertEqual(self.importer.cache.flush(), 2048)
        self.assertEqual(self.importer.cache.bytes(), 0)


if __name__ == "__main__":
    unittest.main()
