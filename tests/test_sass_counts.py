"""benchmarks/sass_counts.py on a listing shaped as `cuobjdump -sass` prints one."""

from benchmarks.sass_counts import loop_instructions, spills

LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                      /* 0x0000000000007919 */
        /*0020*/                   STL [R1], R0 ;                            /* 0x0000000001007387 */
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;         /* 0x0000000c0804723c */
        /*0040*/               @P0 BRA 0x30 ;                                /* 0xfffffffc00f00947 */
        /*0050*/                   LDS.U8 R2, [R3] ;                         /* 0x0000000003027984 */
        /*0060*/                   STL.64 [R1+0x8], R4 ;                     /* 0x0000080401007387 */
        /*0070*/              @!P1 BRA 0x10 ;                                /* 0xffffff9000f09947 */
        /*0080*/                   EXIT ;                                    /* 0x000000000000794d */
        /*0090*/                   BRA 0x90;                                 /* 0xfffffffc00fc7947 */
"""


def test_the_key_loop_is_the_widest_backward_branch() -> None:
    # 0x10..0x70 (7 instructions) holds the inner 0x30..0x40; the trailing self-branch is a trap
    assert loop_instructions(LISTING) == 7


def test_a_listing_without_a_loop_counts_none() -> None:
    assert (
        loop_instructions(LISTING.replace("BRA 0x10", "BRA 0x80").replace("BRA 0x30", "BRA 0x50"))
        == 0
    )


def test_spills_are_the_local_memory_stores() -> None:
    assert spills(LISTING) == 2
    assert spills(LISTING.replace("STL", "STS")) == 0
