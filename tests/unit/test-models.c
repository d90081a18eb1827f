/* The shipped model files are the ones models/stories260K/README.md describes: each file's
 * size and sha256 equal its row in the README's table (`| file | bytes | sha256 |`). The
 * hashes are read from the README, not repeated here, so the README stays the one record. */
#include "sha256-hex.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


struct model_row {
	const char *file;
	int found;
	unsigned long long bytes;
	char sha256[SHA256_HEX_LEN + 1];
};

/* Copies the cell text between two '|' without surrounding blanks. */
static void cell_text(const char *start, const char *end, char *out, size_t out_len)
{
	while (start < end && (*start == ' ' || *start == '\t'))
		start++;
	while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
		end--;
	size_t n = (size_t)(end - start);
	cr_assert_lt(n, out_len, "table cell too long");
	memcpy(out, start, n);
	out[n] = '\0';
}

/* Fills rows[] from the README's table lines; other lines are skipped. */
static void parse_readme(char *text, struct model_row *rows, size_t n_rows)
{
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
		char cells[3][128];
		const char *bar = line;
		size_t n_cells = 0;

		if (line[0] != '|')
			continue;
		/* Cells are the texts between consecutive bars. */
		for (const char *next; n_cells < 3 && (next = strchr(bar + 1, '|')); bar = next)
			cell_text(bar + 1, next, cells[n_cells++], sizeof(cells[0]));
		if (n_cells != 3)
			continue;
		for (size_t i = 0; i < n_rows; i++) {
			if (strcmp(cells[0], rows[i].file))
				continue;
			cr_assert(!rows[i].found, "README lists %s twice", rows[i].file);
			char *end;
			rows[i].bytes = strtoull(cells[1], &end, 10);
			cr_assert(end != cells[1] && *end == '\0', "bad byte count for %s: %s",
				  rows[i].file, cells[1]);
			cr_assert_eq(strlen(cells[2]), SHA256_HEX_LEN, "bad sha256 for %s: %s",
				     rows[i].file, cells[2]);
			memcpy(rows[i].sha256, cells[2], SHA256_HEX_LEN + 1);
			rows[i].found = 1;
		}
	}
}


Test(models, sha256_matches_readme)
{
	struct model_row rows[] = {
		{ .file = "stories260K.bin" },
		{ .file = "tok512.bin" },
		{ .file = "stories260K.gguf" },
	};
	const size_t n_rows = sizeof(rows) / sizeof(rows[0]);
	char *readme = tu_read_file(tu_model_path("README.md"), NULL);

	parse_readme(readme, rows, n_rows);
	free(readme);
	for (size_t i = 0; i < n_rows; i++) {
		size_t len;
		char hex[SHA256_HEX_LEN + 1];

		cr_assert(rows[i].found, "README.md has no table row for %s", rows[i].file);
		char *data = tu_read_file(tu_model_path(rows[i].file), &len);
		cr_assert_eq(len, rows[i].bytes, "%s: %zu bytes, README says %llu", rows[i].file,
			     len, rows[i].bytes);
		sha256_hex(data, len, hex);
		cr_assert_str_eq(hex, rows[i].sha256, "%s: sha256 %s, README says %s",
				 rows[i].file, hex, rows[i].sha256);
		free(data);
	}
}

/* The hashing itself: the FIPS 180-2 test vector for "abc". */
Test(models, sha256_known_vector)
{
	char hex[SHA256_HEX_LEN + 1];

	sha256_hex("abc", 3, hex);
	cr_assert_str_eq(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}
