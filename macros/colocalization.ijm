// Colocalization of two channels: Pearson's correlation coefficient and
// Manders-like overlap coefficients after thresholds, per time point, over
// every Z plane (voxel-wise), computed in the macro language on the pixels.
//
//   Pearson  r  = sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) sum((b - mean b)^2))
//   M1 = sum of a over voxels with a >= ta and b >= tb / sum of a over voxels with a >= ta
//   M2 = sum of b over voxels with a >= ta and b >= tb / sum of b over voxels with b >= tb
//   Overlap = voxels above both thresholds / voxels above either threshold
// Thresholds ta, tb: an auto threshold method over the channel's whole Z stack,
// or fixed values; a voxel is "above" when its value is >= the threshold.
//
// Input:  the current image, a hyperstack with at least two channels.
// Output images: none (the input image is closed).
// Output tables: "Results" (one row per time point)
//   Results: Frame, ChannelA, ChannelB, Pearson, ThresholdA, ThresholdB, M1,
//      M2, Overlap, Voxels.

#@ Integer (label="Channel A", value=1, min=1, description="1-based index of the first channel") channel_a
#@ Integer (label="Channel B", value=2, min=1, description="1-based index of the second channel") channel_b
#@ String (label="Threshold method", choices={"Otsu", "Default", "Triangle", "Huang", "Li", "MaxEntropy", "Mean", "Moments", "Yen", "IsoData", "fixed"}, value="Otsu", description="Auto threshold method for both channels, or fixed to use the values below") threshold_method
#@ Double (label="Fixed threshold A", value=0, description="Threshold of channel A when the method is fixed") threshold_a
#@ Double (label="Fixed threshold B", value=0, description="Threshold of channel B when the method is fixed") threshold_b

if (nImages == 0)
    exit("colocalization: no input image");
input = getImageID();
Stack.getDimensions(width, height, channels, slices, frames);
if (channel_a < 1 || channel_a > channels || channel_b < 1 || channel_b > channels)
    exit("colocalization: channels " + channel_a + " and " + channel_b + " must be within 1.." + channels);
if (channel_a == channel_b)
    exit("colocalization: channel_a and channel_b are the same channel (" + channel_a + ")");

// a copy of one channel of one time point (all Z), in its own pixel type
function channel_copy(image, c, frame, title) {
    selectImage(image);
    run("Duplicate...", "title=" + title + " duplicate channels=" + c + " frames=" + frame);
    return getImageID();
}

function to_float(image) {
    selectImage(image);
    run("32-bit");
}

// voxel count, mean, min, max, std over every plane of an image
function voxel_stats(image) {
    selectImage(image);
    if (nSlices > 1) Stack.getStatistics(n, mean, min, max, std);
    else getStatistics(n, mean, min, max, std);
    return newArray(n, mean, min, max, std);
}

// the mean over every voxel of a stack
function stack_mean(image) {
    s = voxel_stats(image);
    return s[1];
}

// lower threshold of a channel copy: auto over the whole stack, or fixed
// (script parameters are not global inside functions: pass them in)
function threshold_of(image, method, fixed) {
    if (method == "fixed") return fixed;
    selectImage(image);
    setAutoThreshold(method + " dark stack");
    getThreshold(lower, upper);
    resetThreshold();
    return lower;
}

// product of two stacks as a new 32-bit stack
function product(a, b, title) {
    imageCalculator("Multiply create 32-bit stack", a, b);
    rename(title);
    return getImageID();
}

// a 0/1 mask of voxels >= threshold, 32-bit
function above(image, threshold, title) {
    selectImage(image);
    run("Duplicate...", "title=" + title + " duplicate");
    run("Macro...", "code=[v = (v >= " + d2s(threshold, 9) + ")] stack");
    return getImageID();
}

function close_image(image) {
    selectImage(image);
    close();
}

run("Clear Results");
for (frame = 1; frame <= frames; frame++) {
    a = channel_copy(input, channel_a, frame, "_coloc_a");
    b = channel_copy(input, channel_b, frame, "_coloc_b");
    stats_a = voxel_stats(a);
    voxels = stats_a[0];
    mean_a = stats_a[1];
    mean_b = stack_mean(b);
    // thresholds on the channels' own pixel type (integers for 8/16-bit)
    ta = threshold_of(a, threshold_method, threshold_a);
    tb = threshold_of(b, threshold_method, threshold_b);
    to_float(a);
    to_float(b);

    // Pearson: centred copies (for precision), then means of their products;
    // the residual means of the copies are taken out exactly
    selectImage(a);
    run("Duplicate...", "title=_coloc_da duplicate");
    da = getImageID();
    run("Subtract...", "value=" + d2s(mean_a, 9) + " stack");
    selectImage(b);
    run("Duplicate...", "title=_coloc_db duplicate");
    db = getImageID();
    run("Subtract...", "value=" + d2s(mean_b, 9) + " stack");
    e_a = stack_mean(da);
    e_b = stack_mean(db);
    p_ab = product(da, db, "_coloc_ab");
    p_aa = product(da, da, "_coloc_aa");
    p_bb = product(db, db, "_coloc_bb");
    s_ab = stack_mean(p_ab) - e_a * e_b;
    s_aa = stack_mean(p_aa) - e_a * e_a;
    s_bb = stack_mean(p_bb) - e_b * e_b;
    pearson = NaN;
    if (s_aa > 0 && s_bb > 0) pearson = s_ab / sqrt(s_aa * s_bb);

    // Manders-like coefficients: masks of voxels above each threshold
    ma = above(a, ta, "_coloc_ma");
    mb = above(b, tb, "_coloc_mb");
    both = product(ma, mb, "_coloc_both");
    n_a = stack_mean(ma);
    n_b = stack_mean(mb);
    n_both = stack_mean(both);
    a_in_a = product(a, ma, "_coloc_a_in_a");
    a_in_both = product(a, both, "_coloc_a_in_both");
    b_in_b = product(b, mb, "_coloc_b_in_b");
    b_in_both = product(b, both, "_coloc_b_in_both");
    m1 = NaN;
    m2 = NaN;
    overlap = NaN;
    sum_a = stack_mean(a_in_a);
    sum_b = stack_mean(b_in_b);
    if (sum_a > 0) m1 = stack_mean(a_in_both) / sum_a;
    if (sum_b > 0) m2 = stack_mean(b_in_both) / sum_b;
    either = n_a + n_b - n_both;
    if (either > 0) overlap = n_both / either;

    row = frame - 1;
    setResult("Frame", row, frame);
    setResult("ChannelA", row, channel_a);
    setResult("ChannelB", row, channel_b);
    setResult("Pearson", row, pearson);
    setResult("ThresholdA", row, ta);
    setResult("ThresholdB", row, tb);
    setResult("M1", row, m1);
    setResult("M2", row, m2);
    setResult("Overlap", row, overlap);
    setResult("Voxels", row, voxels);

    images = newArray(a, b, da, db, p_ab, p_aa, p_bb, ma, mb, both, a_in_a, a_in_both, b_in_b, b_in_both);
    for (i = 0; i < images.length; i++) close_image(images[i]);
}
updateResults();
selectImage(input);
close();
