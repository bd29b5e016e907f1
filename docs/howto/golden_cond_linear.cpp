// Read condconv_ref golden vectors from C++17 with no library, and check a
// C++ cond_linear_layer forward pass against them.
//
//   g++ -std=c++17 -O2 -o golden_cond_linear docs/howto/golden_cond_linear.cpp
//   ./golden_cond_linear condconv_ref/golden_data/00*-cond_linear_layer.npz
//
// An .npz is a zip archive of .npy files; condconv_ref writes it uncompressed
// ("stored"), so reading it is walking the zip's local file headers and
// parsing each .npy header.  Only what golden vectors use is handled:
// little-endian float64/float32, C order, no zip64.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

struct Array {
    std::vector<std::size_t> shape;
    std::vector<double> data;  // float32 files are widened to double
    double operator()(std::size_t i, std::size_t j) const { return data[i * shape[1] + j]; }
    double operator()(std::size_t i, std::size_t j, std::size_t k) const {
        return data[(i * shape[1] + j) * shape[2] + k];
    }
};

static std::uint32_t le32(const unsigned char* p) {
    return p[0] | (p[1] << 8) | (p[2] << 16) | (std::uint32_t(p[3]) << 24);
}
static std::uint16_t le16(const unsigned char* p) { return std::uint16_t(p[0] | (p[1] << 8)); }

// Parse one .npy file: magic, version, header length, a Python dict literal
// {'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }, then the data.
static Array parse_npy(const unsigned char* p, std::size_t size, const std::string& name) {
    if (size < 10 || std::memcmp(p, "\x93NUMPY", 6) != 0)
        throw std::runtime_error(name + ": not an .npy file");
    const bool v1 = p[6] == 1;
    const std::size_t header_len = v1 ? le16(p + 8) : le32(p + 8);
    const std::size_t start = v1 ? 10 : 12;
    const std::string header(reinterpret_cast<const char*>(p + start), header_len);
    if (header.find("'fortran_order': False") == std::string::npos)
        throw std::runtime_error(name + ": Fortran order is not supported");
    const bool f8 = header.find("'<f8'") != std::string::npos;
    if (!f8 && header.find("'<f4'") == std::string::npos)
        throw std::runtime_error(name + ": expected little-endian float64 or float32");
    Array a;
    const auto open = header.find('(', header.find("'shape'"));
    const auto close = header.find(')', open);
    for (std::size_t i = open + 1; i < close;) {
        while (i < close && (header[i] == ' ' || header[i] == ',')) ++i;
        if (i >= close) break;
        std::size_t used = 0;
        a.shape.push_back(std::stoul(header.substr(i, close - i), &used));
        i += used;
    }
    std::size_t count = 1;
    for (auto n : a.shape) count *= n;
    const unsigned char* data = p + start + header_len;
    if (start + header_len + count * (f8 ? 8 : 4) > size)
        throw std::runtime_error(name + ": truncated data");
    a.data.resize(count);
    for (std::size_t i = 0; i < count; ++i) {
        if (f8) {
            std::memcpy(&a.data[i], data + 8 * i, 8);
        } else {
            float value;
            std::memcpy(&value, data + 4 * i, 4);
            a.data[i] = value;
        }
    }
    return a;
}

// Read every member "name.npy" of an uncompressed .npz into {name: Array}.
static std::map<std::string, Array> load_npz(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw std::runtime_error(path + ": cannot open");
    const std::vector<unsigned char> bytes{std::istreambuf_iterator<char>(file), {}};
    std::map<std::string, Array> arrays;
    std::size_t at = 0;
    while (at + 30 <= bytes.size() && le32(&bytes[at]) == 0x04034b50) {  // local file header
        const unsigned char* h = &bytes[at];
        if (le16(h + 6) & 0x8) throw std::runtime_error(path + ": streamed zip entries unsupported");
        if (le16(h + 8) != 0) throw std::runtime_error(path + ": compressed member; expected stored");
        const std::size_t size = le32(h + 22), name_len = le16(h + 26), extra_len = le16(h + 28);
        std::string name(reinterpret_cast<const char*>(h + 30), name_len);
        const std::size_t data = at + 30 + name_len + extra_len;
        if (data + size > bytes.size()) throw std::runtime_error(path + ": truncated member " + name);
        if (name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0) name.resize(name.size() - 4);
        arrays[name] = parse_npy(&bytes[data], size, path + ":" + name);
        at = data + size;
    }
    return arrays;
}

// Your implementation: the linear CondConv layer, y_b = sum_e a_be (W_e x_b + beta_e)
// with routing a = sigmoid(x R^T + r).  Next to each output element it computes the
// element's scale s, the sum of the magnitudes of the terms that went into it: the same
// sums on absolute values, with the routing weight a replaced by a + s_a, where
// s_a = a (1 - a) s_z + a carries the rounding of z = x R^T + r (scale s_z = |x| |R|^T + |r|)
// through the sigmoid, plus the sigmoid's own.
struct Result {
    Array y, scale;
};

static Result cond_linear_layer(const std::map<std::string, Array>& in) {
    const Array &x = in.at("x"), &experts = in.at("experts"), &route = in.at("route_weight");
    const bool has_bias = in.count("bias") > 0, has_route_bias = in.count("route_bias") > 0;
    const std::size_t B = x.shape[0], F_in = x.shape[1], E = experts.shape[0], F_out = experts.shape[1];
    Result r{{{B, F_out}, std::vector<double>(B * F_out, 0.0)},
             {{B, F_out}, std::vector<double>(B * F_out, 0.0)}};
    for (std::size_t b = 0; b < B; ++b) {
        for (std::size_t e = 0; e < E; ++e) {
            double z = has_route_bias ? in.at("route_bias").data[e] : 0.0;
            double z_scale = std::fabs(z);
            for (std::size_t f = 0; f < F_in; ++f) {
                z += x(b, f) * route(e, f);
                z_scale += std::fabs(x(b, f) * route(e, f));
            }
            const double alpha = 1.0 / (1.0 + std::exp(-z));
            const double alpha_scale = alpha * (1.0 - alpha) * z_scale + alpha;
            for (std::size_t o = 0; o < F_out; ++o) {
                double out = has_bias ? in.at("bias")(e, o) : 0.0;
                double out_scale = std::fabs(out);
                for (std::size_t f = 0; f < F_in; ++f) {
                    out += experts(e, o, f) * x(b, f);
                    out_scale += std::fabs(experts(e, o, f) * x(b, f));
                }
                r.y.data[b * F_out + o] += alpha * out;
                r.scale.data[b * F_out + o] += (alpha + alpha_scale) * out_scale;
            }
        }
    }
    return r;
}

// gamma_n(u) = n u / (1 - n u): the relative error of n rounded operations.
static double gamma(double n, double u) { return n * u / (1.0 - n * u); }

int main(int argc, char** argv) {
    int failures = 0;
    for (int i = 1; i < argc; ++i) {
        const auto arrays = load_npz(argv[i]);
        const Array& expected = arrays.at("output");
        const Result actual = cond_linear_layer(arrays);
        // The golden bound (condconv_ref.accuracy), for float64 vectors and a float64 layer:
        // |a - r| <= beta = 2 gamma_n(u) s + 2 n (2 lambda u) (1 + s), u = 2^-53, lambda = 2^-1022,
        // n = L + 4 with L the longest sum of the forward pass (E * F_in here; the
        // manifest's "lengths"[0]) and 4 roundings for exp and the division of the sigmoid.
        const double n = double(arrays.at("experts").shape[0] * arrays.at("x").shape[1]) + 4.0;
        const double u = 0x1p-53, lambda = 0x1p-1022;
        bool ok = actual.y.shape == expected.shape;
        double worst = 0.0;  // the largest |a - r| / beta: at most 1 passes
        for (std::size_t j = 0; ok && j < expected.data.size(); ++j) {
            const double s = actual.scale.data[j];
            const double beta = 2.0 * gamma(n, u) * s + 2.0 * n * ((2.0 * lambda) * u) * (1.0 + s);
            worst = std::fmax(worst, std::fabs(actual.y.data[j] - expected.data[j]) / beta);
        }
        ok = ok && worst <= 1.0;
        failures += !ok;
        std::printf("%s %s: largest error %.2g x the bound\n", ok ? "PASS" : "FAIL", argv[i], worst);
    }
    return failures ? 1 : 0;
}
